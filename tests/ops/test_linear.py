"""linear: every CPU implementation against the float32 reference (catalogue tolerance)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cpu_conformance import assert_conforms, params

from backends.cpu import ops as cpu_ops


@pytest.mark.parametrize(("impl", "case"), params("linear"))
def test_linear_matches_reference(impl, case):
    assert_conforms(impl, case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_torch_multiplies_prefill_rows_in_float32(monkeypatch, dtype):
    # from UPCAST_MIN_ROWS rows on (no AMX): one float32 matmul of the upcast operands, rounded once;
    # below, the half-precision GEMM itself
    monkeypatch.setattr(cpu_ops, "_bfloat16_matrix_units", lambda: False)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g).to(dtype)
    x = torch.randn(1, cpu_ops.UPCAST_MIN_ROWS, 64, generator=g).to(dtype)
    got = cpu_ops.linear_cpu(x, w)
    assert got.dtype == dtype and torch.equal(got, F.linear(x.float(), w.float()).to(dtype))
    few = x[:, :cpu_ops.UPCAST_MIN_ROWS - 1]
    assert torch.equal(cpu_ops.linear_cpu(few, w), F.linear(few, w))
    monkeypatch.setattr(cpu_ops, "_bfloat16_matrix_units", lambda: True)  # AMX: the bf16 GEMM throughout
    assert torch.equal(cpu_ops.linear_cpu(x, w), F.linear(x, w))
