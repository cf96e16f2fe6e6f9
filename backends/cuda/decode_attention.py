"""``attention_decode`` as flash-decoding in Triton: split-K over each cache row, then a reduction.

Layout (the catalogue's, ``hal/ops.py``): q `[B, T, H, D]`, k_cache / v_cache `[B, C, Hk, D]`
(contiguous in D; any other strides), kv_lens `[B]` int64 **read on the device** (no host sync,
so a CUDA graph can capture the call). The torch twin is ``backends.cpu.ops.attention_decode_cpu``;
the judge is ``backends.cpu.reference.attention.attention_decode_ref``.

Work split (shapes only, never data):
- The rows of one program are the T x G queries of one KV group (G = H // Hk, any G): query t,
  head g is row ``t * G + g``; rows are tiled in blocks of ``BLOCK_M`` (>= 16 for ``tl.dot``).
- Row b's ``kv_lens[b]`` keys are cut into ``splits`` equal ranges (a multiple of ``BLOCK_N``
  long, sized on the device from kv_lens), one program each; every split writes its partial
  output and log-sum-exp to float32 scratch, and :func:`combine_splits` merges them (with one
  split the kernel writes the output itself). The split count depends on C and the program
  count only, so a captured graph stays valid for any kv_lens.
- Keys past a row's length are never loaded (masked loads), so stale NaN in unused cache
  positions cannot leak in; a query that sees no key returns zeros.

Precision: scores and the softmax in float32; float32 inputs multiply in IEEE float32 (no TF32),
bf16 / fp16 ones on tensor cores with float32 accumulation (the probabilities are rounded to
the value dtype before ``p @ v``, as flash attention does).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per inner step
MAX_SPLITS = 64


@triton.jit
def softmax_tile(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """One online-softmax step over a key tile: scores ``s`` [M, N] (already scaled and masked
    with -inf), values ``v`` [N, D]; running max ``m_i`` [M], sum ``l_i`` [M], output ``acc``
    [M, D] in float32. Returns the updated (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def softmax_finish(m_i, l_i, acc):
    """(output [M, D], log-sum-exp [M]) of an online softmax; rows that saw no key give zeros and
    -inf."""
    seen_any = l_i > 0
    out = tl.where(seen_any[:, None], acc / tl.where(seen_any, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(seen_any, m_i + tl.log(tl.where(seen_any, l_i, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, o_part_ptr, lse_part_ptr, o_ptr,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kc, stride_kh,
    stride_vb, stride_vc, stride_vh,
    stride_ob, stride_ot, stride_oh,
    T, G, KV_HEADS, SPLITS, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
    DIRECT: tl.constexpr,
):
    pid_m = tl.program_id(0)  # axis 0: the only one allowed more than 65535 programs
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // KV_HEADS
    kh = pid_bh % KV_HEADS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T * G
    t = rows // G
    h = kh * G + rows % G
    dims = tl.arange(0, HEAD_DIM)

    length = tl.load(lens_ptr + b).to(tl.int32)
    last = length - T + t  # [BLOCK_M]: the last key each row sees
    per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    stop = tl.minimum(start + per_split, length)

    q = tl.load(q_ptr + b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = k_ptr + b * stride_kb + kh * stride_kh
    v_base = v_ptr + b * stride_vb + kh * stride_vh
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < stop
        k = tl.load(k_base + cols[:, None] * stride_kc + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vc + dims[None, :], mask=col_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        seen = (cols[None, :] <= last[:, None]) & col_ok[None, :]
        s = tl.where(seen, s * scale, float("-inf"))
        m_i, l_i, acc = softmax_tile(s, v, m_i, l_i, acc, IEEE)
    out, lse = softmax_finish(m_i, l_i, acc)
    if DIRECT:  # one split: the output itself
        tl.store(o_ptr + b * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + dims[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (pid_bh * SPLITS + split) * (T * G) + rows  # scratch `[B * Hk, SPLITS, T * G]`
        tl.store(o_part_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=row_ok[:, None])
        tl.store(lse_part_ptr + part, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    o_part_ptr, lse_part_ptr, o_ptr,
    stride_ob, stride_ot, stride_oh,
    ROWS, G, KV_HEADS, SPLITS,
    BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = pid_bh // KV_HEADS
    kh = pid_bh % KV_HEADS
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < ROWS
    dims = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    for split in range(0, SPLITS):  # online merge: each split's output weighted by exp(its lse)
        part = (pid_bh * SPLITS + split) * ROWS + rows
        lse = tl.load(lse_part_ptr + part, mask=row_ok, other=float("-inf"))
        o = tl.load(o_part_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse - m_safe)  # 0 for a split that saw no key
        total = total * alpha + w
        acc = acc * alpha[:, None] + o * w[:, None]
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    t = rows // G
    h = kh * G + rows % G
    tl.store(o_ptr + b * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def block_rows(rows: int) -> int:
    """Rows per program: the T x G rows of a KV group, a power of two in [16, 64]."""
    return min(64, max(16, triton.next_power_of_2(rows)))


def choose_splits(programs: int, capacity: int, sm_count: int = 132) -> int:
    """Splits per cache row from shapes only: enough programs for ~2 waves over ``sm_count``
    multiprocessors, no split shorter than 256 keys of the capacity."""
    wanted = -(-2 * sm_count // max(1, programs))
    return max(1, min(MAX_SPLITS, wanted, -(-capacity // 256)))


def combine_splits(o_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor, group: int) -> None:
    """Merge split partials into ``out`` `[B, T, H, D]` (written in place, its dtype).

    o_part: `[B * Hk, S, T * G, D]` float32 (each split's normalised output); lse_part:
    `[B * Hk, S, T * G]` float32 (its log-sum-exp, -inf when the split saw no key)."""
    programs, splits, rows, dim = o_part.shape
    kv_heads = out.shape[2] // group
    block = min(64, max(16, triton.next_power_of_2(rows)))
    _combine_kernel[(-(-rows // block), programs)](
        o_part, lse_part, out, out.stride(0), out.stride(1), out.stride(2),
        rows, group, kv_heads, splits,
        BLOCK_R=block, HEAD_DIM=dim,
    )


def split_scratch(programs: int, splits: int, rows: int, dim: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (o_part `[P, S, R, D]`, lse_part `[P, S, R]`) for :func:`combine_splits`; one
    element each when there is a single split (the kernel then writes the output directly)."""
    if splits == 1:
        return (torch.empty(1, dtype=torch.float32, device=device),) * 2
    return (torch.empty(programs, splits, rows, dim, dtype=torch.float32, device=device),
            torch.empty(programs, splits, rows, dtype=torch.float32, device=device))


def check_decode_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor,
                      op: str = "attention_decode") -> None:
    """One-line ValueErrors for layouts the kernels cannot read."""
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"cuda.{op}: expected q [B, T, H, D] and caches [B, C, Hk, D], got "
                         f"{list(q.shape)}, {list(k_cache.shape)}, {list(v_cache.shape)}")
    batch, _, heads, dim = q.shape
    if k_cache.shape[0] != batch or k_cache.shape[3] != dim or heads % k_cache.shape[2]:
        raise ValueError(f"cuda.{op}: caches {list(k_cache.shape)} do not fit q {list(q.shape)}")
    if kv_lens.shape != (batch,):
        raise ValueError(f"cuda.{op}: kv_lens must be [B] = [{batch}], got {list(kv_lens.shape)}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"cuda.{op}: {name} must be contiguous in D, got strides {list(x.stride())}")


def attention_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Catalogue ``attention_decode``.

    Args:
        q (Tensor): `[B, T, H, D]`, contiguous in D; the T new queries of each row.
        k_cache, v_cache (Tensor): `[B, C, Hk, D]`, contiguous in D, q's dtype; H % Hk == 0.
        kv_lens (Tensor): `[B]` int64, keys held by each row (moved to q's device, never read here).
        scale (float): softmax scale, normally ``1/sqrt(D)``.

    Returns:
        o (Tensor): `[B, T, H, D]`, q's dtype.
    """
    check_decode_args(q, k_cache, v_cache, kv_lens)
    batch, new, heads, dim = q.shape
    capacity, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    rows = new * group
    block_m = block_rows(rows)
    row_blocks = -(-rows // block_m)
    splits = choose_splits(batch * kv_heads * row_blocks, capacity)
    lens = kv_lens.to(device=q.device, dtype=torch.int32)
    o_part, lse_part = split_scratch(batch * kv_heads, splits, rows, dim, q.device)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _decode_split_kernel[(row_blocks, batch * kv_heads, splits)](
        q, k_cache, v_cache, lens, o_part, lse_part, out,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        new, group, kv_heads, splits, scale,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, HEAD_DIM=dim, IEEE=q.dtype == torch.float32, DIRECT=splits == 1,
    )
    if splits > 1:
        combine_splits(o_part, lse_part, out, group)
    return out
