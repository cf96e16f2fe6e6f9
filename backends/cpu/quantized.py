"""The CPU's packed quantized linears ("cpu.torch"): torch's own weight-only kernels, no C++ of ours.

torch 2.13's CPU int4 kernel ``_weight_int4pack_mm_for_cpu(x [M, K], packed, group, qScaleAndZeros)``
takes ``packed`` from ``_convert_weight_to_int4pack_for_cpu(q int32 [N, K] in 0..15, 1)`` (uint8
`[N, K/2]`, its own order) and ``qScaleAndZeros`` `[K/group, N, 2]` in x's dtype, and computes,
measured against that formula to NMSE 4.5e-14 in float32 (tests/ops/test_quantized_cpu.py checks it)::

    w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n],   g = k // group

with group in {32, 64, 128, 256} and N a multiple of 16. Every container maps onto it:

``Int4Weight``  ``s * (q - z) + m = (q - 8) * s + (s * (8 - z) + m)``: scale s, zero s (8 - z) + m.
``TernaryWeight`` codes c = t + 8 in {7, 8, 9}: ``s * t = (c - 8) * s``, zero 0 (a zero of 7 s with
                codes t + 1 would round apart from the scale in bfloat16: NMSE 5e-4 measured).
``Int8Weight``  grouped (Q8_0): the unsigned byte u = q + 128 = 16 hi + lo splits into two nibbles,
                ``s q = (hi - 8) * 16 s + (lo - 8) * s + 8 s``: one int4 product over K' = 2K with
                the weight ``[hi | lo]`` and the activation ``[x | x]``, 1 byte per weight as int8.
                One group per row (per output channel): torch's ``_weight_int8pack_mm``.

A container group of any multiple of 32 is cut into kernel groups of the largest allowed size
that divides it (scales repeated); output rows are padded to a multiple of 16 (zero codes, zero
scales) and the padding sliced off. A container that fits neither (group not a multiple of 32)
is prepared as its dense decoding (:class:`DenseFallback`, named in reports).

Only bfloat16 is served (``supports``): the kernels' float32 and float16 paths are scalar loops,
measured 14-27x slower than the dense float32 matmul on the SmolLM2 shapes (1 thread, [1, 576] x
[576, 960]: int4 float32 974 us, float16 1554 us, bfloat16 37 us; dense float32 68 us, dense
bfloat16 93 us). The float32 path is exact (NMSE 4.5e-14 with float32 scales) but slower than
decoding; running float32 activations through the bfloat16 kernel would miss float32's 1e-10
(NMSE ~5e-6 measured, ``tests/ops/test_quantized_cpu.py``). float32 models get the dequant
implementation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hal import quant

KERNEL_GROUPS = (256, 128, 64, 32)
ROW_MULTIPLE = 16


@dataclass(frozen=True)
class Int4Packed:
    """What the int4 kernel takes: ``packed`` (its uint8 layout of `[N', K']`), ``scales_zeros``
    `[K'/group, N', 2]` bfloat16, N' = ``out_features`` padded to 16; ``doubled``: K' = 2K and
    the activation is ``[x | x]`` (grouped int8)."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor
    group: int
    out_features: int
    doubled: bool = False
    layout = "torch int4pack"

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2


@dataclass(frozen=True)
class Int8PerChannel:
    """``_weight_int8pack_mm``'s operands: q int8 `[N, K]`, scales bfloat16 `[N]`."""

    q: torch.Tensor
    scales: torch.Tensor
    layout = "torch int8pack"

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scales.numel() * 2


@dataclass(frozen=True)
class DenseFallback:
    """A container no packed kernel takes (group size not a multiple of 32): its dense decoding."""

    weight: torch.Tensor
    layout = "dense (group size not a multiple of 32)"

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def supports(ctx) -> str | None:
    if ctx.dtype != torch.bfloat16:
        return (f"cpu.torch: dtype must be bfloat16 (torch's CPU int4/int8 kernels are vectorized for it only: "
                f"their float32/float16 paths measured 14-27x slower than a dense matmul), got {ctx.dtype_name}")
    return None


def kernel_group(group_size: int) -> int | None:
    """The largest kernel group size dividing ``group_size`` (None: none does)."""
    return next((g for g in KERNEL_GROUPS if group_size % g == 0), None)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def pack_int4_kernel(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                     dtype: torch.dtype = torch.bfloat16) -> Int4Packed:
    """codes 0..15 `[N, K]`, kernel-form scales and zeros float32 `[N, K / group_size]` (``w =
    (code - 8) * scale + zero``) -> :class:`Int4Packed`; ``group_size`` a multiple of 32."""
    n, k = codes.shape
    group = kernel_group(group_size)
    repeat = group_size // group
    rows = -(-n // ROW_MULTIPLE) * ROW_MULTIPLE
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_pad_rows(codes.to(torch.int32), rows), 1)
    sz = torch.stack([scales.repeat_interleave(repeat, 1), zeros.repeat_interleave(repeat, 1)], dim=-1)
    sz = _pad_rows(sz, rows).transpose(0, 1).contiguous().to(dtype)  # [K/group, N', 2]
    return Int4Packed(packed, sz, group, n)


def prepare_int4(weight: quant.Int4Weight, ctx) -> Int4Packed | DenseFallback:
    if kernel_group(weight.group_size) is None:
        return DenseFallback(weight.dequantize().to(ctx.dtype))
    s = weight.scales
    zero = s * (8 - weight.zeros) + (weight.mins if weight.mins is not None else 0)
    return pack_int4_kernel(weight.values(), s, zero, weight.group_size, ctx.dtype)


def prepare_ternary(weight: quant.TernaryWeight, ctx) -> Int4Packed | DenseFallback:
    if kernel_group(weight.group_size) is None:
        return DenseFallback(weight.dequantize().to(ctx.dtype))
    codes = (weight.values() + 8).to(torch.uint8)
    return pack_int4_kernel(codes, weight.scales, torch.zeros_like(weight.scales), weight.group_size, ctx.dtype)


def prepare_int8(weight: quant.Int8Weight, ctx) -> Int4Packed | Int8PerChannel | DenseFallback:
    if weight.groups == 1:
        # a copy: torch's allocations are 64-byte aligned, a view of a memory-mapped checkpoint need not
        # be, and _weight_int8pack_mm segfaults on a misaligned weight (measured: offset 40 mod 64)
        return Int8PerChannel(weight.q.clone(), weight.scales[:, 0].to(ctx.dtype).contiguous())
    if kernel_group(weight.group_size) is None:
        return DenseFallback(weight.dequantize().to(ctx.dtype))
    unsigned = weight.q.to(torch.int16) + 128
    s = weight.scales
    codes = torch.cat([unsigned >> 4, unsigned & 0xF], dim=1)  # [N, 2K]: hi nibbles, then lo nibbles
    scales = torch.cat([16 * s, s], dim=1)
    zeros = torch.cat([torch.zeros_like(s), 8 * s], dim=1)
    packed = pack_int4_kernel(codes, scales, zeros, weight.group_size, ctx.dtype)
    return Int4Packed(packed.packed, packed.scales_zeros, packed.group, packed.out_features, doubled=True)


def linear_packed(x: torch.Tensor, weight: Int4Packed | Int8PerChannel | DenseFallback) -> torch.Tensor:
    """x `[..., K]` bfloat16 @ a prepared weight -> `[..., O]` in x's dtype."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    if isinstance(weight, Int4Packed):
        if weight.doubled:
            flat = torch.cat([flat, flat], dim=1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), weight.packed, weight.group,
                                                       weight.scales_zeros)
        if y.shape[1] != weight.out_features:
            y = y[:, :weight.out_features]
    elif isinstance(weight, Int8PerChannel):
        y = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), weight.q, weight.scales)
    else:
        y = torch.nn.functional.linear(flat, weight.weight)
    return y.reshape(*lead, y.shape[-1])
