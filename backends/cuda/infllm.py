"""InfLLM-v2 in Triton: the stage-1 kernel scores and block-sparse attention, for any GQA ratio.

Torch twins: ``backends.cpu.infllm`` (``_kernel_scores`` + ``_select``, ``_attend_gathered``);
judges: ``backends.cpu.reference.infllm``. Semantics: ``hal/ops.py`` (infllm_select_blocks,
block_sparse_attention).

Stage 1 (:func:`kernel_scores_triton`): one program per KV head of a row and a tile of queries;
its rows are (query, group head) pairs, the G heads of a KV group padded to a power of two, so
the group sum is a reshape + sum over a register tile and any G works (the official CUDA kernel
reduces over exactly 16 rows per warp and silently mis-sums other ratios). Per row: an online
log-sum-exp over the visible coarse kernels (or, before any coarse kernel completes, the visible
fine ones), then ``sum_g exp(scale * q . kernel_j - lse_g)`` for the visible fine kernels.
Max-pooling into blocks, the forced init / local blocks and the top-k (ties: lower index first)
run in torch on those scores (``backends.cpu.infllm._select``).

Block-sparse attention (:func:`block_sparse_attention_triton`): one program per (row, KV head,
query, split of the selected-block list); its rows are the G heads of the group; each selected
block is one ``block_size``-key tile; splits merge through the flash-decoding reduction of
``decode_attention.py``. Keys past the query or in -1 entries are never loaded.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.cpu.infllm import _select
from backends.cuda.decode_attention import (check_decode_args, choose_splits, combine_splits, softmax_finish,
                                            softmax_tile, split_scratch)
from hal.sparse import InfLLMGeometry

KERNEL_TILE = 64  # kernels per inner step of stage 1
QUERY_CHUNK = 1024  # queries scored and selected at once (bounds the torch top-k's memory)


@triton.jit
def _visible_count(position, size, stride, count):
    """Kernels (of ``size``/``stride``) complete at ``position``, at most ``count`` (device scalar)."""
    return tl.minimum(tl.where(position >= size - 1, (tl.maximum(position, size - 1) - size + 1) // stride + 1, 0),
                      count)


@triton.jit
def _kernel_scores_kernel(
    q_ptr, fine_ptr, coarse_ptr, lens_ptr, s_ptr,
    stride_qb, stride_qt, stride_qh,
    stride_fb, stride_fn, stride_fh,
    stride_cb, stride_cn, stride_ch,
    T, T_OFFSET, T_ALL, G, KV_HEADS, N1, N2, FALLBACK, scale,
    KS: tl.constexpr, KR: tl.constexpr, CS: tl.constexpr, CR: tl.constexpr,
    BT: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // KV_HEADS
    kh = pid_bh % KV_HEADS
    rows = tl.arange(0, BT * GP)
    t = pid_t * BT + rows // GP  # query index inside this chunk
    g = rows % GP
    row_ok = (t < T) & (g < G)
    dims = tl.arange(0, HEAD_DIM)
    length = tl.load(lens_ptr + b).to(tl.int32)
    pos = length - T_ALL + T_OFFSET + t  # the query's position in its row
    pos_max = length - T_ALL + T_OFFSET + tl.minimum(pid_t * BT + BT - 1, T - 1)
    q = tl.load(q_ptr + b * stride_qb + t[:, None] * stride_qt + (kh * G + g)[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    cols = tl.arange(0, BLOCK_N)

    # 1. log-sum-exp over the visible coarse kernels
    m_c = tl.full([BT * GP], float("-inf"), tl.float32)
    l_c = tl.zeros([BT * GP], tl.float32)
    n_coarse = _visible_count(pos_max, CS, CR, N2)
    c_base = coarse_ptr + b * stride_cb + kh * stride_ch
    for n0 in range(0, n_coarse, BLOCK_N):
        n = n0 + cols
        kc = tl.load(c_base + n[:, None] * stride_cn + dims[None, :], mask=(n < n_coarse)[:, None], other=0.0)
        if IEEE:
            x = tl.dot(q, tl.trans(kc), input_precision="ieee")
        else:
            x = tl.dot(q, tl.trans(kc))
        seen = (n[None, :] * CR + CS - 1 <= pos[:, None]) & (n < n_coarse)[None, :]
        x = tl.where(seen, x * scale, float("-inf"))
        m_new = tl.maximum(m_c, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_c = l_c * tl.exp(m_c - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m_c = m_new

    # 1b. before the first coarse kernel completes: over the visible fine kernels instead
    m_f = tl.full([BT * GP], float("-inf"), tl.float32)
    l_f = tl.zeros([BT * GP], tl.float32)
    f_base = fine_ptr + b * stride_fb + kh * stride_fh
    n_fallback = tl.minimum(_visible_count(pos_max, KS, KR, N1), FALLBACK)
    for n0 in range(0, n_fallback, BLOCK_N):
        n = n0 + cols
        kf = tl.load(f_base + n[:, None] * stride_fn + dims[None, :], mask=(n < n_fallback)[:, None], other=0.0)
        if IEEE:
            x = tl.dot(q, tl.trans(kf), input_precision="ieee")
        else:
            x = tl.dot(q, tl.trans(kf))
        seen = (n[None, :] * KR + KS - 1 <= pos[:, None]) & (n < n_fallback)[None, :]
        x = tl.where(seen, x * scale, float("-inf"))
        m_new = tl.maximum(m_f, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_f = l_f * tl.exp(m_f - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m_f = m_new

    has_coarse = pos >= CS - 1
    m = tl.where(has_coarse, m_c, m_f)
    l = tl.where(has_coarse, l_c, l_f)
    lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("inf"))  # inf: nothing visible

    # 2. the normalised fine-kernel scores, summed over the group's heads
    n_fine = _visible_count(pos_max, KS, KR, N1)
    t_out = pid_t * BT + tl.arange(0, BT)
    s_base = s_ptr + (pid_bh * T + t_out[:, None]) * N1
    for n0 in range(0, n_fine, BLOCK_N):
        n = n0 + cols
        kf = tl.load(f_base + n[:, None] * stride_fn + dims[None, :], mask=(n < n_fine)[:, None], other=0.0)
        if IEEE:
            x = tl.dot(q, tl.trans(kf), input_precision="ieee")
        else:
            x = tl.dot(q, tl.trans(kf))
        seen = (n[None, :] * KR + KS - 1 <= pos[:, None]) & (n < n_fine)[None, :] & row_ok[:, None]
        p = tl.where(seen, tl.exp(x * scale - lse[:, None]), 0.0)
        summed = tl.sum(tl.reshape(p, [BT, GP, BLOCK_N]), axis=1)  # [BT, BLOCK_N]
        tl.store(s_base + n[None, :], summed, mask=(t_out < T)[:, None] & (n < n_fine)[None, :])


def _tile(group: int) -> tuple[int, int]:
    """(queries per program, padded group): rows = BT * GP >= 16 for ``tl.dot``."""
    gp = triton.next_power_of_2(group)
    return max(1, 32 // gp), gp


def kernel_scores_triton(q: torch.Tensor, kernels: torch.Tensor, coarse: torch.Tensor, kv_lens: torch.Tensor,
                         geometry: InfLLMGeometry, scale: float, t_offset: int = 0,
                         t_all: int | None = None) -> torch.Tensor:
    """Stage-1 scores of queries ``q`` `[B, T, H, D]` -> s `[B, Hk, T, N1]` float32 (0 where not
    visible). ``t_offset`` / ``t_all``: q holds queries ``t_offset ..`` of a call with ``t_all``
    queries (query t of the call sits at ``kv_lens[b] - t_all + t``)."""
    g = geometry
    batch, new, heads, dim = q.shape
    fine_count, kv_heads = kernels.shape[1], kernels.shape[2]
    group = heads // kv_heads
    bt, gp = _tile(group)
    s = torch.zeros(batch, kv_heads, new, fine_count, dtype=torch.float32, device=q.device)
    if fine_count == 0 or new == 0:
        return s
    # fine kernels complete at the last position without a coarse kernel (coarse_size - 2)
    fallback = g.kernels(g.coarse_size - 1)
    _kernel_scores_kernel[(-(-new // bt), batch * kv_heads)](
        q, kernels, coarse, kv_lens.to(device=q.device, dtype=torch.int32), s,
        q.stride(0), q.stride(1), q.stride(2),
        kernels.stride(0), kernels.stride(1), kernels.stride(2),
        coarse.stride(0), coarse.stride(1), coarse.stride(2),
        new, t_offset, new if t_all is None else t_all, group, kv_heads, fine_count, coarse.shape[1], fallback, scale,
        KS=g.kernel_size, KR=g.kernel_stride, CS=g.coarse_size, CR=g.coarse_stride,
        BT=bt, GP=gp, BLOCK_N=KERNEL_TILE, HEAD_DIM=dim, IEEE=q.dtype == torch.float32,
    )
    return s


def infllm_select_blocks_triton(q: torch.Tensor, kernels: torch.Tensor, coarse: torch.Tensor, kv_lens: torch.Tensor,
                                geometry: InfLLMGeometry, scale: float) -> torch.Tensor:
    """Catalogue ``infllm_select_blocks``: q `[B, T, H, D]`, kernels `[B, N1, Hk, D]`, coarse
    `[B, N2, Hk, D]` (contiguous in D), kv_lens `[B]` -> block ids `[B, Hk, T, K]` int64,
    ascending, -1 padded. Scores by the Triton stage-1 kernel, pooled and ranked in torch,
    :data:`QUERY_CHUNK` queries at a time."""
    batch, new, heads, _ = q.shape
    if heads % kernels.shape[2] or q.stride(-1) != 1 or kernels.stride(-1) != 1 or coarse.stride(-1) != 1:
        raise ValueError(f"cuda.infllm_select_blocks: expected q [B, T, H, D] and kernels [B, N, Hk, D] contiguous "
                         f"in D with H % Hk == 0, got {list(q.shape)}, {list(kernels.shape)}")
    longest = kernels.shape[1] * geometry.kernel_stride + geometry.kernel_size - 1
    blocks = -(-longest // geometry.block_size)
    pos = kv_lens.to(q.device)[:, None] - new + torch.arange(new, device=q.device)[None, :]  # [B, T]
    out = []
    for start in range(0, new, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, new)
        s = kernel_scores_triton(q[:, start:stop], kernels, coarse, kv_lens, geometry, scale, start, new)
        out.append(_select(s, pos[:, start:stop], geometry, blocks))
    chosen = torch.cat(out, dim=2)
    return chosen.masked_fill((pos < 0)[:, None, :, None], -1)


@triton.jit
def _block_sparse_kernel(
    q_ptr, k_ptr, v_ptr, blocks_ptr, lens_ptr, o_part_ptr, lse_part_ptr, o_ptr,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kc, stride_kh,
    stride_vb, stride_vc, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_bb, stride_bh, stride_bt,
    T, G, KV_HEADS, CAPACITY, BUDGET, SPLITS, scale,
    BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
    DIRECT: tl.constexpr,
):
    t = tl.program_id(0)  # axis 0: the only one allowed more than 65535 programs (prefill queries)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // KV_HEADS
    kh = pid_bh % KV_HEADS
    g = tl.arange(0, BLOCK_M)
    row_ok = g < G
    dims = tl.arange(0, HEAD_DIM)
    last = tl.load(lens_ptr + b).to(tl.int32) - T + t
    q = tl.load(q_ptr + b * stride_qb + t * stride_qt + (kh * G + g)[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = k_ptr + b * stride_kb + kh * stride_kh
    v_base = v_ptr + b * stride_vb + kh * stride_vh
    ids = blocks_ptr + b * stride_bb + kh * stride_bh + t * stride_bt
    per_split = tl.cdiv(BUDGET, SPLITS)
    for i in range(split * per_split, tl.minimum(split * per_split + per_split, BUDGET)):
        block = tl.load(ids + i)
        cols = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        col_ok = (cols >= 0) & (cols <= last) & (cols < CAPACITY)  # block -1: negative cols
        k = tl.load(k_base + cols[:, None] * stride_kc + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vc + dims[None, :], mask=col_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(col_ok[None, :], s * scale, float("-inf"))
        m_i, l_i, acc = softmax_tile(s, v, m_i, l_i, acc, IEEE)
    out, lse = softmax_finish(m_i, l_i, acc)
    if DIRECT:  # one split: the output itself
        tl.store(o_ptr + b * stride_ob + t * stride_ot + (kh * G + g)[:, None] * stride_oh + dims[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (pid_bh * SPLITS + split) * (T * G) + t * G + g  # scratch `[B * Hk, SPLITS, T * G]`
        tl.store(o_part_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=row_ok[:, None])
        tl.store(lse_part_ptr + part, lse, mask=row_ok)


def block_sparse_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                                  kv_lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Catalogue ``block_sparse_attention``.

    Args:
        q (Tensor): `[B, T, H, D]`, contiguous in D.
        k_cache, v_cache (Tensor): `[B, C, Hk, D]`, contiguous in D, q's dtype.
        blocks (Tensor): `[B, Hk, T, K]` int64, distinct block ids per query, -1 ignored.
        kv_lens (Tensor): `[B]` int64 (read on the device).
        block_size (int): tokens per block, a power of two >= 16.
        scale (float): softmax scale.

    Returns:
        o (Tensor): `[B, T, H, D]`, q's dtype.
    """
    check_decode_args(q, k_cache, v_cache, kv_lens, "block_sparse_attention")
    batch, new, heads, dim = q.shape
    capacity, kv_heads = k_cache.shape[1], k_cache.shape[2]
    budget = blocks.shape[-1]
    if blocks.shape[:3] != (batch, kv_heads, new):
        raise ValueError(f"cuda.block_sparse_attention: blocks must be [B, Hk, T, K] = {[batch, kv_heads, new, budget]},"
                         f" got {list(blocks.shape)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"cuda.block_sparse_attention: block_size must be a power of two >= 16, got {block_size}")
    group = heads // kv_heads
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if budget == 0:
        return out.zero_()
    # split the block list only when rows x queries leave the GPU idle (decode)
    splits = max(1, min(budget, choose_splits(batch * kv_heads * new, budget * block_size)))
    o_part, lse_part = split_scratch(batch * kv_heads, splits, new * group, dim, q.device)
    ids = blocks.to(device=q.device, dtype=torch.int32)
    _block_sparse_kernel[(new, batch * kv_heads, splits)](
        q, k_cache, v_cache, ids, kv_lens.to(device=q.device, dtype=torch.int32), o_part, lse_part, out,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        ids.stride(0), ids.stride(1), ids.stride(2),
        new, group, kv_heads, capacity, budget, splits, scale,
        BLOCK_M=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size, HEAD_DIM=dim,
        IEEE=q.dtype == torch.float32, DIRECT=splits == 1,
    )
    if splits > 1:
        combine_splits(o_part, lse_part, out, group)
    return out
