"""The CPU packed quantized linears (backends/cpu/quantized.py) beyond the conformance grid: the
formula torch's int4 kernel computes (written here, checked in float32 where it is exact), why
float32 is refused (the bfloat16 kernel would miss its 1e-10), and the layouts that need a
regrouping, row padding, a nibble split (grouped int8) or the dense fallback."""
from __future__ import annotations

import pytest
import torch

from backends.cpu import quantized
from hal import quant
from hal.registry import BindContext, bind
from validation.opcheck import random_container

BF16 = BindContext("cpu", torch.bfloat16, {})


def _nmse(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).pow(2).mean() / want.pow(2).mean())


def test_torch_int4_kernel_computes_q_minus_8_times_scale_plus_zero():
    g = torch.Generator().manual_seed(0)
    n, k, group = 32, 128, 32
    codes = torch.randint(0, 16, (n, k), generator=g)
    scale, zero = torch.rand(n, k // group, generator=g) + 0.5, torch.randn(n, k // group, generator=g)
    packed = quantized.pack_int4_kernel(codes, scale, zero, group, torch.float32)
    x = torch.randn(3, k, generator=g)
    w = (codes.float() - 8) * scale.repeat_interleave(group, 1) + zero.repeat_interleave(group, 1)
    assert _nmse(quantized.linear_packed(x, packed), x @ w.t()) < 1e-12


def test_float32_through_the_bfloat16_kernel_would_miss_the_float32_tolerance():
    g = torch.Generator().manual_seed(1)
    weight = random_container(g, "linear_int4", "q4_1", 256, 512, 32)
    x = torch.randn(4, 512, generator=g)
    want = x @ weight.dequantize().t()
    got = quantized.linear_packed(x.bfloat16(), quantized.prepare_int4(weight, BF16))
    assert _nmse(got, want) > 1e-10  # float32's tolerance (hal/ops.py): hence supports() refuses float32
    assert quantized.supports(BindContext("cpu", torch.float32, {})) is not None
    assert bind("cpu", torch.float32, {}).record["linear_int4"].impl == "cpu.dequant"
    assert bind("cpu", torch.bfloat16, {}).record["linear_int4"].impl == "cpu.torch"


@pytest.mark.parametrize(("op", "source", "rows", "k", "group", "layout"), [
    ("linear_int4", "gptq", 40, 576, 576, "Int4Packed"),  # one group per row: cut into kernel groups of 64
    ("linear_int4", "q4_0", 24, 96, 96, "Int4Packed"),  # 24 rows: padded to 32
    ("linear_int4", "gptq", 32, 96, 48, "DenseFallback"),  # 48 is not a multiple of 32
    ("linear_int8", "q8_0", 48, 128, 32, "Int4Packed"),  # grouped int8: hi/lo nibbles over [x | x]
    ("linear_int8", "rtn", 48, 128, 128, "Int8PerChannel"),
    ("linear_ternary", "bitcpm4", 24, 64, 64, "Int4Packed"),
    ("linear_ternary", "rtn", 16, 40, 8, "DenseFallback"),
])
def test_layouts_match_the_float32_decoding(op, source, rows, k, group, layout):
    g = torch.Generator().manual_seed(rows + k)
    weight = random_container(g, op, source, rows, k, group)
    prepare = getattr(quantized, f"prepare_{op.removeprefix('linear_')}")
    prepared = prepare(weight, BF16)
    assert type(prepared).__name__ == layout
    x = torch.randn(2, 3, k, generator=g).bfloat16()
    got = quantized.linear_packed(x, prepared)
    assert got.shape == (2, 3, rows) and got.dtype == torch.bfloat16
    assert _nmse(got, x.float() @ weight.dequantize().t()) < 1e-4  # bfloat16's linear tolerance


def test_grouped_int8_split_is_exact_in_the_formula():
    # u = q + 128 = 16 hi + lo: (hi - 8) * 16 + (lo - 8) + 8 == q for every int8 q (times s)
    q = torch.arange(-128, 128)
    u = q + 128
    assert torch.equal((u // 16 - 8) * 16 + (u % 16 - 8) + 8, q)


def test_ternary_prepared_with_codes_t_plus_8_keeps_zeros_exact():
    t = torch.tensor([[-1, 0, 1, 0] * 8] * 16)
    weight = quant.TernaryWeight(name="t", source="rtn", out_features=16, in_features=32, group_size=32,
                                 scales=torch.full((16, 1), 0.3), packed=quant.pack_ternary(t))
    prepared = quantized.prepare_ternary(weight, BF16)
    x = torch.zeros(1, 32).bfloat16()
    x[0, 1] = 1.0  # picks the column of zeros
    assert torch.equal(quantized.linear_packed(x, prepared).float(), torch.zeros(1, 16))
