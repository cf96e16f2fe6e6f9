"""Weight-only quantized linears in Triton: ``linear_int4`` (W4A16), ``linear_int8`` (W8A16) and
``linear_ternary`` (W2A16), the activations in their own dtype (float32 / bfloat16 / float16).

Prepared layout (:func:`prepare_packed`, once at bind time, from a ``hal.quant`` container
`[O, K]`; here ``N = O``): K runs along rows so that a program's loads are contiguous in N.

``codes``  int4: uint8 `[K/2, N]`, ``q[k, n] = (codes[k // 2, n] >> 4 * (k % 2)) & 0xF``;
           ternary: uint8 `[K/4, N]`, ``c[k, n] = (codes[k // 4, n] >> 2 * (k % 4)) & 3`` (``t = c - 1``);
           int8: int8 `[K, N]`, the signed values themselves.
``scales`` `[G, N]`; ``zeros`` `[G, N]` only where they vary (GPTQ asymmetric), else the constant
           ``zero`` (Q4_0 8, Q4_1 / int8 0, ternary 1); ``mins`` `[G, N]` (Q4_1) or none.
           Stored in float16 when every value of the tensor is exactly a float16 (GGUF and GPTQ
           keep their scales, mins and zero points in float16), else float32: never rounded.

Each tile is decoded in float32 in the order of the container's own decoding (``hal/quant.py``):
``w = s * (q - z) (+ m)``, so a float32 activation gets the reference's weights exactly.

Paths (chosen from M = the rows of x, shapes only, so a CUDA graph can capture the call):
- GEMV (M <= :data:`GEMV_ROWS`, decode): one program per (BLOCK_N outputs, row, K split);
  ``x * w`` summed over K in float32 (no rounding of the weights at all); K is split so that
  N / BLOCK_N programs still fill the card, the float32 partials summed afterwards.
- GEMM (prefill): ``tl.dot`` tiles; bfloat16 / float16 activations multiply the weight tile
  rounded to their dtype on tensor cores with float32 accumulation, float32 ones in IEEE
  float32 (no TF32).

A tile never straddles two groups (BLOCK_K divides the group size), hence the group size must be a
multiple of 16 (``tl.dot``'s smallest K); :func:`prepare_packed` refuses others with the reason.
The torch twin of the decoding is :func:`dequantize_packed`; the judge is the catalogue's float32
reference ``backends.cpu.reference.linear.quantized_linear_ref``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backends.cuda.supports import QUANT_GROUP_MULTIPLE as MIN_GROUP
from hal import quant
from hal.errors import UnsupportedOpError
from hal.probing import torch_device

GEMV_ROWS = 4
"""Rows of x up to which the GEMV path runs (batch-1 / small-batch decode)."""
BITS = {"linear_int4": 4, "linear_int8": 8, "linear_ternary": 2}
SM_COUNT = 132  # H100 / H200: the GEMV splits K until ~2 waves of programs


@dataclass(frozen=True, eq=False)
class PackedQuantLinear:
    """What the Triton implementation receives for one quantized weight (layout above)."""

    op: str
    bits: int
    out_features: int
    in_features: int
    group_size: int
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    mins: torch.Tensor | None
    zero: float

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros, self.mins)
                   if t is not None)


def _lossless(t: torch.Tensor) -> torch.Tensor:
    """float32 `[O, G]` -> `[G, O]` in float16 when that is exact, else float32."""
    half = t.to(torch.float16)
    keep = half if torch.equal(half.float(), t) else t
    return keep.t().contiguous()


def _pack_along_k(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes `[O, K]` in [0, 2**bits) -> uint8 `[K * bits / 8, O]`, entry k at bits ``bits * (k % per)``."""
    per = 8 // bits
    t = codes.to(torch.int32).t()
    out = torch.zeros(t.shape[0] // per, t.shape[1], dtype=torch.int32)
    for i in range(per):
        out |= t[i::per] << (bits * i)
    return out.to(torch.uint8).contiguous()


def unsupported_reason(weight: quant.QuantizedWeight) -> str | None:
    """Why the kernels cannot take ``weight`` (None when they can)."""
    if weight.group_size % MIN_GROUP:
        return (f"cuda.{weight.op}: group_size must be a multiple of {MIN_GROUP} (one group per K tile, "
                f"tl.dot's smallest K), got {weight.group_size} ({weight.name})")
    return None


def prepare_packed(weight: quant.QuantizedWeight, ctx) -> PackedQuantLinear:
    """A ``hal.quant`` container -> :class:`PackedQuantLinear` on ``ctx.device`` (layout above).

    Raises UnsupportedOpError naming the tensor when :func:`unsupported_reason` refuses it."""
    reason = unsupported_reason(weight)
    if reason is not None:
        raise UnsupportedOpError(reason)
    op = weight.op
    zeros = mins = None
    if isinstance(weight, quant.Int4Weight):
        codes = _pack_along_k(weight.values(), 4)
        if bool((weight.zeros == weight.zeros.flatten()[0]).all()):
            zero = float(weight.zeros.flatten()[0])
        else:
            zero, zeros = 0.0, _lossless(weight.zeros)
        mins = None if weight.mins is None else _lossless(weight.mins)
    elif isinstance(weight, quant.TernaryWeight):
        codes, zero = _pack_along_k(weight.values().to(torch.int32) + 1, 2), 1.0
    elif isinstance(weight, quant.Int8Weight):
        codes, zero = weight.q.t().contiguous(), 0.0
    else:
        raise UnsupportedOpError(f"cuda.{op}: no Triton layout for {type(weight).__name__}")
    device = torch_device(ctx.device)
    move = (lambda t: None if t is None else t.to(device))
    return PackedQuantLinear(op, BITS[op], weight.out_features, weight.in_features, weight.group_size,
                             move(codes), move(_lossless(weight.scales)), move(zeros), move(mins), zero)


def dequantize_packed(p: PackedQuantLinear) -> torch.Tensor:
    """The torch twin of the kernels' decoding: float32 `[O, K]` from the packed layout."""
    if p.bits == 8:
        q = p.codes.float()
    else:
        per = 8 // p.bits
        rows = torch.arange(p.in_features, device=p.codes.device)
        q = ((p.codes[rows // per].to(torch.int32) >> (p.bits * (rows % per))[:, None]) & ((1 << p.bits) - 1)).float()

    def expand(t: torch.Tensor) -> torch.Tensor:
        return t.float().repeat_interleave(p.group_size, dim=0)

    z = p.zero if p.zeros is None else expand(p.zeros)
    w = expand(p.scales) * (q - z)
    return (w if p.mins is None else w + expand(p.mins)).t()


@triton.jit
def _decode_tile(codes_ptr, scales_ptr, zeros_ptr, mins_ptr, k0, offs_k, offs_n, n_ok, N, zero,
                 GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr):
    """float32 weights `[BLOCK_K, BLOCK_N]` of rows k0 + offs_k (one group) and columns offs_n."""
    k = k0 + offs_k
    if BITS == 8:
        q = tl.load(codes_ptr + k[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0).to(tl.float32)
    else:
        PER: tl.constexpr = 8 // BITS
        byte = tl.load(codes_ptr + (k // PER)[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0)
        q = ((byte.to(tl.int32) >> ((k % PER) * BITS)[:, None]) & ((1 << BITS) - 1)).to(tl.float32)
    g = k0 // GROUP
    s = tl.load(scales_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(zeros_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        w = s[None, :] * (q - z[None, :])
    else:
        w = s[None, :] * (q - zero)
    if HAS_MINS:
        w += tl.load(mins_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return w


@triton.jit
def _gemv_kernel(x_ptr, codes_ptr, scales_ptr, zeros_ptr, mins_ptr, out_ptr, part_ptr,
                 M, N, K_PER_SPLIT, zero, stride_xm, stride_om,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                 HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, DIRECT: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], tl.float32)
    start = split * K_PER_SPLIT
    for k0 in range(start, start + K_PER_SPLIT, BLOCK_K):
        x = tl.load(x_ptr + m * stride_xm + k0 + offs_k).to(tl.float32)
        w = _decode_tile(codes_ptr, scales_ptr, zeros_ptr, mins_ptr, k0, offs_k, offs_n, n_ok, N, zero,
                         GROUP, BITS, HAS_ZEROS, HAS_MINS)
        acc += tl.sum(x[:, None] * w, axis=0)
    if DIRECT:
        tl.store(out_ptr + m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:  # float32 partials `[SPLITS, M, N]`
        tl.store(part_ptr + (split * M + m) * N + offs_n, acc, mask=n_ok)


@triton.jit
def _gemm_kernel(x_ptr, codes_ptr, scales_ptr, zeros_ptr, mins_ptr, out_ptr,
                 M, N, K, zero, stride_xm, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                 BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, IEEE: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_ok[:, None], other=0.0)
        w = _decode_tile(codes_ptr, scales_ptr, zeros_ptr, mins_ptr, k0, offs_k, offs_n, n_ok, N, zero,
                         GROUP, BITS, HAS_ZEROS, HAS_MINS)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w.to(a.dtype))
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def block_k(group_size: int, limit: int) -> int:
    """The largest power of two <= ``limit`` dividing ``group_size`` (>= 16 by :func:`unsupported_reason`)."""
    size = limit
    while group_size % size:
        size //= 2
    return size


def choose_splits(programs: int, tiles: int, sm_count: int = SM_COUNT) -> int:
    """K splits of the GEMV: a divisor of the K tile count, up to ~2 waves of programs."""
    wanted = max(1, -(-2 * sm_count // max(1, programs)))
    return max(d for d in range(1, min(wanted, tiles) + 1) if tiles % d == 0)


def linear_quantized_triton(x: torch.Tensor, weight: PackedQuantLinear, sm_count: int = SM_COUNT) -> torch.Tensor:
    """x `[..., K]` (float32 / bfloat16 / float16) @ the prepared weight `[O, K]`.T -> `[..., O]` in x.dtype."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"cuda.{weight.op}: x [..., {x.shape[-1]}] does not fit the weight "
                         f"[{weight.out_features}, {weight.in_features}]")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, n, k = x2.shape[0], weight.out_features, weight.in_features
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out.reshape(*lead, n)
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    mins = weight.mins if weight.mins is not None else weight.scales
    flags = dict(GROUP=weight.group_size, BITS=weight.bits, HAS_ZEROS=weight.zeros is not None,
                 HAS_MINS=weight.mins is not None)
    if rows <= GEMV_ROWS:
        bn, bk = 64, block_k(weight.group_size, 128)
        tiles = k // bk
        splits = choose_splits(triton.cdiv(n, bn) * rows, tiles, sm_count)
        part = out if splits == 1 else torch.empty(splits, rows, n, dtype=torch.float32, device=x.device)
        _gemv_kernel[(triton.cdiv(n, bn), rows, splits)](
            x2, weight.codes, weight.scales, zeros, mins, out, part,
            rows, n, k // splits, weight.zero, x2.stride(0), out.stride(0),
            BLOCK_N=bn, BLOCK_K=bk, DIRECT=splits == 1, **flags)
        if splits > 1:
            out.copy_(part.sum(0))
    else:
        bm = min(64, max(16, triton.next_power_of_2(rows)))
        bn, bk = 64, block_k(weight.group_size, 64)
        _gemm_kernel[(triton.cdiv(rows, bm), triton.cdiv(n, bn))](
            x2, weight.codes, weight.scales, zeros, mins, out,
            rows, n, k, weight.zero, x2.stride(0), out.stride(0),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=x.dtype == torch.float32, **flags)
    return out.reshape(*lead, n)
