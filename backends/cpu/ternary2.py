"""BitCPM4 ternary held in 2 bits on the CPU ("cpu.torch_2bit"): torch's int4 kernel fed one
chunk of output rows at a time, each chunk's int4 codes rebuilt from 2 bits per call.

``backends/cpu/quantized.py`` (``cpu.torch``, the default) prepares a ternary weight as 4-bit codes
t + 8 for ``_weight_int4pack_mm_for_cpu``: 0.5 byte per weight plus a bfloat16 (scale, zero) per
kernel group. No torch CPU kernel takes 2-bit weights, so this implementation keeps what the
int4 kernel would read, compressed to 2 bits, and expands it per call (no C++ of ours):

* Prepare (once): rows are cut into chunks of whole 64-row blocks of at most
  :data:`CHUNK_WEIGHTS` weights (the bound of ``quantized.decode_rows``). Each chunk's codes
  ``q = 4 (t + 1)`` in {0, 4, 8} (padding rows: 4, i.e. t = 0, scale 0) are packed by torch's own
  ``_convert_weight_to_int4pack_for_cpu`` (so any CPU's nibble order is right by construction):
  every nibble then uses bits 2-3 only, and the chunk's first and second halves of bytes share
  one byte, ``stored[j] = p[j] | p[j + h] >> 2`` (``h``: half the chunk's bytes).
* Call: ``p[:h] = stored & 0xCC``, ``p[h:] = (stored << 2) & 0xCC`` (three ops on int32 views,
  4 bytes per element; a shift's bits from the neighbouring byte land in bits 0-1, which the
  mask clears), then the int4 kernel (up to ``quantized.KERNEL_MAX_ROWS`` activation rows) or
  the chunk decoded to float32 + one float32 matmul (``quantized.decode_linear``, above). The
  temporaries of one chunk are all that exist in a wider form at any time.

The kernel computes ``(q - 8) * scale + zero``; with scale s / 4 and zero s that is
``(t - 1) s + s = t s``, every term exact in bfloat16 (the 4-bit path's codes t + 8 need an add
per nibble here; codes t + 1 with zero 7 s would round 7 s apart from s: ``quantized``'s note).
Scales: one per row (``group_size == K``, BitCPM4's and ``model.quantize``'s per-row ternary):
stored as bfloat16 `[O']`; the kernel gets (1/4, 1) (one shared tensor per chunk shape,
:func:`unit_scales`) and the chunk's output is multiplied by the row scales (a second bfloat16
rounding: y = bf16(bf16(x @ t) * s)). Grouped scales (``group_size < K``) are stored as
bfloat16 `[G, O']` and expanded per call into the kernel's `[K/group, rows, 2]`.

Cost (``python -m benchmarks.quant_ops --ternary-2bit``, benchmarks/RESULTS.md): the expansion
reads 2 bits and writes 4 bits per weight per call, about as long as the kernel's own GEMV at one
row, so decode linears take ~2x the 4-bit path's time; prefill (decoding to bfloat16 dominates)
little more. Hence ``cpu.torch`` stays the default and this one is chosen with
``hal.load_model(..., prefer={"linear_ternary": "cpu.torch_2bit"})``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from backends.cpu import quantized
from hal import quant

CHUNK_WEIGHTS = quantized.DECODE_CHUNK_BYTES // 4
"""Weights per chunk at most (at least one 64-row block): 2M, i.e. a 1 MB int4 temporary."""
CHUNK_BLOCK = 64
"""Chunks are whole multiples of this many rows (torch's largest packing block), except the last."""
_HIGH = 0xCCCCCCCC - (1 << 32)  # bits 2-3 and 6-7 of every byte, as an int32


@dataclass(frozen=True)
class TernaryChunk:
    """Output rows ``start:start + rows`` (``rows`` a multiple of 16, padding rows past the
    weight's ``out_features``). ``codes`` int32 `[rows * K / 16]`: the chunk's int4pack bytes,
    two per stored byte (module docstring), viewed as int32. ``scales`` bfloat16 `[rows]` (per
    row) or `[G, rows]` (grouped); padding rows 0."""

    start: int
    rows: int
    codes: torch.Tensor
    scales: torch.Tensor


@dataclass(frozen=True)
class Ternary2Bit:
    """A ternary weight `[O, K]` as :class:`TernaryChunk` s; ``group``: the kernel group size;
    ``repeat``: kernel groups per container group (grouped scales only); ``per_row``: one scale
    per row (applied to the output)."""

    chunks: tuple[TernaryChunk, ...]
    out_features: int
    in_features: int
    group: int
    repeat: int
    per_row: bool
    layout = "2-bit ternary (int4pack rebuilt per chunk per call)"

    @property
    def nbytes(self) -> int:
        return sum(c.codes.numel() * 4 + c.scales.numel() * 2 for c in self.chunks)


def _chunk_rows(out: int, k: int) -> list[tuple[int, int]]:
    """``(start, padded rows)`` of every chunk over ``out`` output rows of ``k`` weights."""
    step = max(1, CHUNK_WEIGHTS // (k * CHUNK_BLOCK)) * CHUNK_BLOCK
    spans = []
    for start in range(0, out, step):
        rows = min(step, out - start)
        spans.append((start, -(-rows // quantized.ROW_MULTIPLE) * quantized.ROW_MULTIPLE))
    return spans


def compress(packed: torch.Tensor) -> torch.Tensor:
    """int4pack bytes uint8 `[rows, K/2]` of codes in {0, 4, 8} -> int32 `[rows * K / 16]` (2 bits per code)."""
    flat = packed.reshape(-1)
    half = flat.numel() // 2
    return (flat[:half] | (flat[half:] >> 2)).view(torch.int32)


def expand(codes: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """The inverse of :func:`compress`: int32 `[rows * K / 16]` -> a new uint8 `[rows, K/2]`."""
    out = torch.empty(rows * k // 2, dtype=torch.uint8)
    words = out.view(torch.int32)
    n = codes.numel()
    torch.bitwise_and(codes, _HIGH, out=words[:n])
    torch.bitwise_left_shift(codes, 2, out=words[n:])
    words[n:].bitwise_and_(_HIGH)
    return out.view(rows, k // 2)


def supports(ctx) -> str | None:
    """``cpu.torch``'s rule (bfloat16 only: the same kernel), under this implementation's name."""
    reason = quantized.supports(ctx)
    return None if reason is None else reason.replace("cpu.torch:", "cpu.torch_2bit:", 1)


@functools.lru_cache(maxsize=32)
def unit_scales(groups: int, rows: int) -> torch.Tensor:
    """bfloat16 `[groups, rows, 2]` of (scale 1/4, zero 1): the kernel then computes ``x @ t``."""
    sz = torch.ones(groups, rows, 2, dtype=torch.bfloat16)
    sz[..., 0] = 0.25
    return sz


def prepare_ternary_2bit(weight: quant.TernaryWeight, ctx) -> Ternary2Bit | quantized.DenseFallback:
    """``hal.quant.TernaryWeight`` -> :class:`Ternary2Bit` (group size not a multiple of 32: the
    dense decoding, as in ``cpu.torch``)."""
    group = quantized.kernel_group(weight.group_size)
    if group is None:
        return quantized.DenseFallback(weight.dequantize().to(ctx.dtype))
    per_row = weight.groups == 1
    k = weight.in_features
    chunks = []
    for start, rows in _chunk_rows(weight.out_features, k):
        stop = min(start + rows, weight.out_features)
        t = quant.unpack_ternary(weight.packed[start:stop])
        codes = torch.full((rows, k), 4, dtype=torch.int32)
        codes[:stop - start] += 4 * t
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scales = torch.zeros(rows, weight.groups, dtype=ctx.dtype)
        scales[:stop - start] = weight.scales[start:stop]
        scales = scales[:, 0].contiguous() if per_row else scales.t().contiguous()
        chunks.append(TernaryChunk(start, rows, compress(packed), scales))
    return Ternary2Bit(tuple(chunks), weight.out_features, k, group, weight.group_size // group, per_row)


def _kernel_scales(weight: Ternary2Bit, chunk: TernaryChunk) -> torch.Tensor:
    """The kernel's bfloat16 `[K/group, rows, 2]` for ``chunk``: (s / 4, s) per group."""
    if weight.per_row:
        return unit_scales(weight.in_features // weight.group, chunk.rows)
    sz = torch.stack((chunk.scales * 0.25, chunk.scales), dim=-1)
    return sz if weight.repeat == 1 else sz.repeat_interleave(weight.repeat, dim=0)


def _chunk_linear(x: torch.Tensor, weight: Ternary2Bit, chunk: TernaryChunk) -> torch.Tensor:
    """x `[M, K]` (contiguous) @ one chunk's rows -> `[M, chunk.rows]`."""
    packed = expand(chunk.codes, chunk.rows, weight.in_features)
    sz = _kernel_scales(weight, chunk)
    if x.shape[0] <= quantized.KERNEL_MAX_ROWS:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, weight.group, sz)
    else:
        y = quantized.decode_linear(x, quantized.Int4Packed(packed, sz, weight.group, chunk.rows,
                                                            quantized.nibble_order(chunk.rows)))
    return y * chunk.scales if weight.per_row else y


def linear_ternary_2bit(x: torch.Tensor, weight: Ternary2Bit | quantized.DenseFallback) -> torch.Tensor:
    """x `[..., K]` bfloat16 @ a :class:`Ternary2Bit` weight -> `[..., O]` in x's dtype."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    if isinstance(weight, quantized.DenseFallback):
        y = torch.nn.functional.linear(flat, weight.weight)
    elif len(weight.chunks) == 1:
        y = _chunk_linear(flat, weight, weight.chunks[0])[:, :weight.out_features]
    else:
        y = flat.new_empty(flat.shape[0], weight.out_features)
        for chunk in weight.chunks:
            stop = min(chunk.start + chunk.rows, weight.out_features)
            y[:, chunk.start:stop] = _chunk_linear(flat, weight, chunk)[:, :stop - chunk.start]
    return y.reshape(*lead, y.shape[-1])
