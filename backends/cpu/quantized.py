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
                This holds 4 bits per weight; ``backends/cpu/ternary2.py`` (``cpu.torch_2bit``,
                chosen with ``hal.load_model(prefer=...)``) holds 2 and rebuilds these per call.
``Int8Weight``  grouped (Q8_0): the unsigned byte u = q + 128 = 16 hi + lo splits into two nibbles,
                ``s q = (hi - 8) * 16 s + (lo - 8) * s + 8 s``: one int4 product over K' = 2K with
                the weight ``[hi | lo]`` and the activation ``[x | x]``, 1 byte per weight as int8.
                One group per row (per output channel): torch's ``_weight_int8pack_mm``.

A container group of any multiple of 32 is cut into kernel groups of the largest allowed size
that divides it (scales repeated); output rows are padded to a multiple of 16 (zero codes, zero
scales) and the padding sliced off. A container that fits neither (group not a multiple of 32)
is prepared as its dense decoding (:class:`DenseFallback`, named in reports).

Prefill: the int4 kernel is a GEMV at heart. At 1 thread it beats a dense bfloat16 matmul 2-3x for
one row but is 6-17x slower at 128 rows (measured, ``python -m benchmarks.quant_ops``). Above
:func:`kernel_max_rows` rows (64 for int4 / ternary, 32 for int8) the packed weight is instead
decoded to float32 on the fly in chunks of output rows (:func:`decode_rows`; a chunk's weight
takes at most :data:`DECODE_CHUNK_BYTES`), each chunk followed by one float32 matmul of the
activations upcast (exact), the output rounded to bfloat16 once: on CPUs without native bfloat16
arithmetic a bfloat16 matmul of the transposed chunk is a slow path (AMD EPYC, AVX2, 2 threads,
128 rows: gate_up [3072, 576] 615 ms in bfloat16 against 19 ms in float32; the dense float32
matmul 5.5 ms, the dense bfloat16 one 29 ms), and with AVX-512 the dense float32 prefill was
still 1.7x the bfloat16 one (benchmarks/RESULTS.md). The decoding reads the kernel's own packed
layout, whose nibble order depends on the CPU (torch packs blocks of 64 rows on AVX512, 32 on
AVX2): :func:`nibble_order` learns it at prepare time by packing row numbers, so no second copy
of the weight is kept. Each weight is evaluated in float32 from the kernel's own bfloat16
scales and zeros, as the kernel evaluates it. The choice depends on shapes only (capturable).

Only bfloat16 is served (``supports``): the kernels' float32 and float16 paths are scalar loops,
measured 14-27x slower than the dense float32 matmul on the SmolLM2 shapes (1 thread, [1, 576] x
[576, 960]: int4 float32 974 us, float16 1554 us, bfloat16 37 us; dense float32 68 us, dense
bfloat16 93 us). The float32 path is exact (NMSE 4.5e-14 with float32 scales) but slower than
decoding; running float32 activations through the bfloat16 kernel would miss float32's 1e-10
(NMSE ~5e-6 measured, ``tests/ops/test_quantized_cpu.py``). float32 models get the dequant
implementation.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Iterator

import torch

from hal import quant

KERNEL_GROUPS = (256, 128, 64, 32)
ROW_MULTIPLE = 16
KERNEL_MAX_ROWS = 64
"""Int4 and ternary: torch's kernel up to this many activation rows, decoding + dense matmul above.
Measured at 1 thread (``python -m benchmarks.quant_ops --threads 1 --crossover``, median us,
kernel / decode + matmul), q4_0 g32: qkv [960, 576] 64 rows 922 / 1235, 128 rows 1892 / 1450;
gate_up [3072, 576] 3152 / 3514, 5832 / 3749; down [576, 1536] 1440 / 1904, 2973 / 1957
(gptq g64 and ternary alike; the kernel costs ~15 us per row of qkv, the decoding ~1.2 ms once)."""
KERNEL_MAX_ROWS_INT8 = 32
"""Int8 (grouped: the int4 kernel over K' = 2K, twice the int4 cost; per channel:
``_weight_int8pack_mm``): the same choice, measured the same way: q8_0 g32 qkv 32 rows 908 / 1602,
64 rows 1812 / 1699, gate_up 3017 / 4692, 6271 / 4853; per channel qkv 479 / 687, 954 / 720,
gate_up 1594 / 2204, 3353 / 2325."""
DECODE_CHUNK_BYTES = 8 << 20
"""One decoded chunk of output rows, its float32 weight, is at most this many bytes (beside it:
its uint8 codes, a quarter of that)."""


@dataclass(frozen=True)
class NibbleOrder:
    """Where ``_convert_weight_to_int4pack_for_cpu`` put each row's nibbles. The packed bytes are
    blocks of ``block_rows`` output rows (the last block may be shorter: ``tail_rows``); block b
    is a `[K, rows_b / 2]` byte table whose byte j holds two rows' nibbles, low nibble = column
    2j, high = 2j + 1; row r of a full block is column ``block_columns[r]``, of the tail block
    ``tail_columns[r]``; ``block_kind`` / ``tail_kind``: their :func:`split_kind`, fixed here so
    the decoding reads no tensor value."""

    block_rows: int
    block_columns: torch.Tensor
    tail_columns: torch.Tensor
    block_kind: str
    tail_kind: str


def _pack_positions(rows: int, k: int) -> torch.Tensor:
    """int64 `[rows * k]`: for every nibble of the packed `[rows, k]` (low nibble of byte 0, high
    nibble of byte 0, ...) the flat index ``n * k + k'`` of the code it holds, found by packing
    the flat indices 4 bits at a time."""
    index = torch.arange(rows * k, dtype=torch.int64).reshape(rows, k)
    where = torch.zeros(rows * k, dtype=torch.int64)
    shift = 0
    while shift == 0 or (index >> shift).any():
        codes = ((index >> shift) & 0xF).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).flatten().to(torch.int64)
        where |= torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten() << shift
        shift += 4
    return where


@functools.lru_cache(maxsize=None)
def nibble_order(rows: int) -> NibbleOrder:
    """The packer's row order for ``rows`` (a multiple of 16) output rows, from packing row
    numbers with K = 2 and K = 4 and checked against every position of the K = 4 packing (the
    order must not depend on K: the kernel's documented blocking)."""
    positions = {k: torch.empty(rows * k, dtype=torch.int64) for k in (2, 4)}
    for k in positions:
        where = _pack_positions(rows, k)
        positions[k][where] = torch.arange(rows * k)  # positions[k][n * k + k'] = nibble index
    p2, p4 = positions[2][0::2], positions[4][0::4]  # k' = 0 of every row
    start = (p4 - p2) // 2  # nibble index of k' = 0 in row n = start * K + column
    column = p2 - 2 * start
    block_rows = next((int(s) for s in start.unique() if s > 0), rows)
    size = torch.bincount(start)[start]  # rows in each row's block
    n, kk = torch.meshgrid(torch.arange(rows), torch.arange(4), indexing="ij")
    expected = start[n] * 4 + kk * size[n] + column[n]
    if not torch.equal(positions[4].view(rows, 4), expected):
        raise RuntimeError("cpu.torch: torch's int4 packing is not blocked by output rows as expected; "
                           "the prefill decoding cannot read it")
    tail = rows % block_rows
    block_columns = column[:block_rows].clone()
    tail_columns = column[rows - tail:].clone() if tail else column[:0].clone()
    return NibbleOrder(block_rows, block_columns, tail_columns, split_kind(block_columns), split_kind(tail_columns))


@dataclass(frozen=True)
class Int4Packed:
    """What the int4 kernel takes: ``packed`` (its uint8 layout of `[N', K']`), ``scales_zeros``
    `[K'/group, N', 2]` bfloat16, N' = ``out_features`` padded to 16; ``doubled``: K' = 2K and
    the activation is ``[x | x]`` (grouped int8); ``order``: where the packer put each row's
    nibbles (for :func:`decode_rows`)."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor
    group: int
    out_features: int
    order: NibbleOrder
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
    return Int4Packed(packed, sz, group, n, nibble_order(rows))


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
    return dataclasses.replace(packed, doubled=True)


def split_kind(columns: torch.Tensor) -> str:
    """How a block's nibble columns map to rows: ``halves`` (rows 0..B/2-1 are the low nibbles
    of bytes 0..B/2-1, the rest the high nibbles: torch's AVX2 / AVX512 full blocks), ``pairs``
    (row r is nibble r % 2 of byte r // 2: its short blocks and scalar build) or ``gather``
    (anything else: an index per row, slower)."""
    block = columns.numel()
    if block == 0:
        return "pairs"  # no tail block
    if torch.equal(columns, torch.cat([torch.arange(0, block, 2), torch.arange(1, block, 2)])):
        return "halves"
    return "pairs" if torch.equal(columns, torch.arange(block)) else "gather"


def _decode_block_codes(weight: Int4Packed, start: int, stop: int, columns: torch.Tensor,
                        kind: str) -> torch.Tensor:
    """uint8 `[K', stop - start]`: the codes of output rows ``start:stop`` (whole packer blocks of
    ``columns.numel()`` rows each, ordered as ``kind`` says), transposed."""
    k = weight.packed.shape[1] * 2
    block = columns.numel()
    table = weight.packed.view(-1)[start * k // 2:stop * k // 2].view(-1, k, block // 2).transpose(0, 1)
    if kind == "halves":
        return torch.cat([table & 0xF, table >> 4], dim=-1).view(k, stop - start)
    nibbles = torch.stack([table & 0xF, table >> 4], dim=-1).view(k, -1, block)  # [K', blocks, column]
    return nibbles.view(k, stop - start) if kind == "pairs" else nibbles[:, :, columns].reshape(k, stop - start)


def _decode_chunk(weight: Int4Packed, start: int, stop: int, columns: torch.Tensor, kind: str) -> torch.Tensor:
    """`[K, stop - start]` float32: rows ``start:stop`` of the weight, transposed, each ``q * scale
    + (zero - 8 scale)`` (= ``(q - 8) * scale + zero``) evaluated in float32 from the kernel's
    bfloat16 scales and zeros. Grouped int8 first joins its nibbles back into ``u = 16 hi + lo = q + 128``
    (integer, exact) and evaluates ``u * s - 128 s`` with s the low half's scale."""
    codes = _decode_block_codes(weight, start, stop, columns, kind)
    k2, rows = codes.shape
    sz = weight.scales_zeros[:, start:stop].float()  # [G', rows, 2]
    if weight.doubled:
        codes = (codes[:k2 // 2] << 4) | codes[k2 // 2:]
        scale = sz[sz.shape[0] // 2:, :, 0]
        zero = -128 * scale
    else:
        scale, zero = sz[..., 0], sz[..., 1] - 8 * sz[..., 0]
    k, groups = codes.shape[0], scale.shape[0]
    out = torch.empty(k, rows, dtype=torch.float32)
    torch.addcmul(zero.unsqueeze(1), codes.view(groups, k // groups, rows), scale.unsqueeze(1),
                  out=out.view(groups, k // groups, rows))
    return out


def decode_rows(weight: Int4Packed) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, w)`` over the padded output rows in chunks of whole packer blocks, ``w``
    `[K, stop - start]` the decoded weight of rows ``start:stop`` transposed, each chunk's float32
    temporaries at most :data:`DECODE_CHUNK_BYTES` (at least one block)."""
    order = weight.order
    rows = weight.scales_zeros.shape[1]
    k2 = weight.packed.shape[1] * 2
    full = rows - order.tail_columns.numel()
    step = max(1, DECODE_CHUNK_BYTES // (4 * k2 * order.block_rows)) * order.block_rows
    for start in range(0, full, step):
        stop = min(start + step, full)
        yield start, stop, _decode_chunk(weight, start, stop, order.block_columns, order.block_kind)
    if full < rows:
        yield full, rows, _decode_chunk(weight, full, rows, order.tail_columns, order.tail_kind)


def decode_linear(x: torch.Tensor, weight: Int4Packed) -> torch.Tensor:
    """x `[M, K]` @ the weight decoded chunk by chunk, in float32 -> `[M, out_features]` in x's
    dtype (one rounding)."""
    xf = x.float()
    y = torch.empty(x.shape[0], weight.out_features, dtype=torch.float32)
    for start, stop, w in decode_rows(weight):
        stop_out = min(stop, weight.out_features)
        if start < stop_out:
            torch.mm(xf, w[:, :stop_out - start], out=y[:, start:stop_out])
    return y.to(x.dtype)


def decode_int8_linear(x: torch.Tensor, weight: Int8PerChannel) -> torch.Tensor:
    """x `[M, K]` @ the per-channel int8 weight decoded in row chunks (q * scale in float32), in
    float32 -> `[M, N]` in x's dtype (one rounding)."""
    n, k = weight.q.shape
    xf = x.float()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    step = max(1, DECODE_CHUNK_BYTES // (4 * k))
    for start in range(0, n, step):
        stop = min(start + step, n)
        w = torch.empty(stop - start, k, dtype=torch.float32)
        torch.mul(weight.q[start:stop], weight.scales[start:stop, None].float(), out=w)
        torch.mm(xf, w.t(), out=y[:, start:stop])
    return y.to(x.dtype)


def kernel_max_rows(weight: Int4Packed | Int8PerChannel) -> int:
    """Up to how many activation rows torch's kernel is faster than decoding (shapes only)."""
    return KERNEL_MAX_ROWS_INT8 if isinstance(weight, Int8PerChannel) or weight.doubled else KERNEL_MAX_ROWS


def kernel_linear(x: torch.Tensor, weight: Int4Packed | Int8PerChannel) -> torch.Tensor:
    """x `[M, K]` @ a packed weight through torch's kernel -> `[M, out_features]`."""
    if isinstance(weight, Int8PerChannel):
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight.q, weight.scales)
    if weight.doubled:
        x = torch.cat([x, x], dim=1)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), weight.packed, weight.group, weight.scales_zeros)
    return y if y.shape[1] == weight.out_features else y[:, :weight.out_features]


def linear_packed(x: torch.Tensor, weight: Int4Packed | Int8PerChannel | DenseFallback) -> torch.Tensor:
    """x `[..., K]` bfloat16 @ a prepared weight -> `[..., O]` in x's dtype: torch's kernel up to
    :func:`kernel_max_rows` rows, the chunked decoding + dense matmul above."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    if isinstance(weight, DenseFallback):
        y = torch.nn.functional.linear(flat, weight.weight)
    elif flat.shape[0] <= kernel_max_rows(weight):
        y = kernel_linear(flat, weight)
    elif isinstance(weight, Int4Packed):
        y = decode_linear(flat, weight)
    else:
        y = decode_int8_linear(flat, weight)
    return y.reshape(*lead, y.shape[-1])
