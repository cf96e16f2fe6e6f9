"""rms_norm: every CPU implementation against the float32 reference (catalogue tolerance); the\nfloat32 fused kernel of the CPU op against the composed formula it replaces (bitwise)."""
from __future__ import annotations

import pytest
import torch

from backends.cpu.ops import add_rms_norm_cpu, rms_norm_cpu, rms_norm_composed
from cpu_conformance import assert_conforms, params


@pytest.mark.parametrize(("impl", "case"), params("rms_norm"))
def test_rms_norm_matches_reference(impl, case):
    assert_conforms(impl, case)


@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 5, 60), (2, 1, 4, 64)])
def test_float32_fused_rms_norm_is_bitwise_the_composed_formula(shape):
    # the eager and the fast decode paths share this op; it must keep the formula's exact values
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * 30
    weight = torch.randn(shape[-1], generator=g)
    assert torch.equal(rms_norm_cpu(x, weight, 1e-5), rms_norm_composed(x, weight, 1e-5))
    y, residual = add_rms_norm_cpu(x, x.flip(-1), weight, 1e-6, 0.25)
    assert torch.equal(residual, torch.add(x.flip(-1), x, alpha=0.25))
    assert torch.equal(y, rms_norm_composed(residual, weight, 1e-6))
