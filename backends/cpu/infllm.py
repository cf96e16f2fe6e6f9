"""InfLLM-v2 ops in portable torch (cpu, and borrowed by cuda and npu): whole-tensor code with
no host read of tensor values (capturable), queries taken in chunks to bound memory.

block_sparse_attention gathers the selected blocks' keys and values, a few queries at a time,
whenever the budget holds fewer keys than the cache (the cost follows the budget, not the cache
length); otherwise it runs masked dense attention over the cache.
"""
from __future__ import annotations

import torch

from backends.cpu.ops import _sdpa_masked, zero_unused
from hal.sparse import InfLLMGeometry

QUERY_CHUNK = 256  # queries scored / attended at once (memory: chunk x capacity per head)
GATHER_QUERIES = 16  # block_sparse_attention gathers blocks for this many queries at a time


def infllm_compress_keys_cpu(k_cache: torch.Tensor, kv_lens: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """k_cache `[B, C, Hk, D]`, kv_lens `[B]` -> kernels `[B, N, Hk, D]`: means over a strided
    window view (no copy of the cache), kernels past a row's length zeroed."""
    batch, capacity, kv_heads, dim = k_cache.shape
    count = max(0, (capacity - size) // stride + 1)
    if count == 0:
        return k_cache.new_zeros(batch, 0, kv_heads, dim)
    windows = k_cache.unfold(1, size, stride)  # [B, N, Hk, D, size]
    means = windows.float().mean(dim=-1)
    ends = torch.arange(count, device=k_cache.device) * stride + size  # one past each kernel's last key
    complete = ends[None, :] <= kv_lens.to(k_cache.device)[:, None]  # [B, N]
    return means.masked_fill(~complete[:, :, None, None], 0.0).to(k_cache.dtype)


def infllm_append_kernel_cpu(kernels: torch.Tensor, k_cache: torch.Tensor, kv_lens: torch.Tensor, size: int,
                             stride: int) -> None:
    """In place: gathers each row's last ``size`` keys, and writes their mean to the kernel they
    complete; rows whose length completes no kernel rewrite kernel 0 with its own value (no host
    read of kv_lens: capturable)."""
    batch, capacity, kv_heads, dim = k_cache.shape
    if kernels.shape[1] == 0:
        return
    lengths = kv_lens.to(k_cache.device)
    ends = (lengths[:, None] - size + torch.arange(size, device=k_cache.device)).clamp(0, capacity - 1)  # [B, size]
    index = ends[:, :, None, None].expand(batch, size, kv_heads, dim)
    mean = k_cache.gather(1, index).float().mean(dim=1).to(kernels.dtype)  # [B, Hk, D]
    completes = (lengths >= size) & ((lengths - size) % stride == 0)
    slot = torch.where(completes, torch.div(lengths - size, stride, rounding_mode="floor"), torch.zeros_like(lengths))
    slot = slot.clamp(max=kernels.shape[1] - 1)
    rows = torch.arange(batch, device=k_cache.device)
    keep = kernels[rows, slot]
    kernels.index_put_((rows, slot), torch.where(completes[:, None, None], mean, keep))


def _overlap_index(g: InfLLMGeometry, blocks: int, kernels: int, device: torch.device) -> torch.Tensor:
    """`[blocks, W]` fine-kernel ids overlapping each block (kernel j covers keys j*stride ..
    j*stride + size - 1), padded with ``kernels`` (the index of a -inf column). Built with
    device arithmetic, not from a host list, so it can be captured."""
    width = -(-(g.block_size + g.kernel_size - 1) // g.kernel_stride) + 1
    c = torch.arange(blocks, device=device)[:, None]
    first = torch.div(c * g.block_size - g.kernel_size, g.kernel_stride, rounding_mode="floor") + 1
    last = torch.div((c + 1) * g.block_size - 1, g.kernel_stride, rounding_mode="floor")
    ids = first.clamp(min=0) + torch.arange(width, device=device)[None, :]
    keep = (ids <= last) & (ids < kernels)
    return torch.where(keep, ids, torch.full_like(ids, kernels))


def _kernel_scores(qf: torch.Tensor, kernels: torch.Tensor, coarse: torch.Tensor, pos: torch.Tensor,
                   g: InfLLMGeometry, scale: float) -> torch.Tensor:
    """qf `[B, T, Hk, G, D]` float32, pos `[B, T]` -> s `[B, Hk, T, N1]` (summed over the group)."""
    fine_end = torch.arange(kernels.shape[1], device=qf.device) * g.kernel_stride + g.kernel_size - 1
    coarse_end = torch.arange(coarse.shape[1], device=qf.device) * g.coarse_stride + g.coarse_size - 1
    fine_vis = (fine_end[None, None, :] <= pos[:, :, None])[:, None, None]  # [B, 1, 1, T, N1]
    coarse_vis = (coarse_end[None, None, :] <= pos[:, :, None])[:, None, None]
    x1 = torch.einsum("btkgd,bnkd->bkgtn", qf, kernels.float()) * scale  # [B, Hk, G, T, N1]
    x2 = torch.einsum("btkgd,bnkd->bkgtn", qf, coarse.float()) * scale
    lse_fine = torch.logsumexp(x1.masked_fill(~fine_vis, float("-inf")), dim=-1)
    lse_coarse = torch.logsumexp(x2.masked_fill(~coarse_vis, float("-inf")), dim=-1)
    lse = torch.where(coarse_vis.any(dim=-1), lse_coarse, lse_fine)  # [B, Hk, G, T]
    probs = torch.exp(x1 - lse[..., None]).masked_fill(~fine_vis, 0.0)
    return probs.sum(dim=2)


def _select(s: torch.Tensor, pos: torch.Tensor, g: InfLLMGeometry, blocks: int) -> torch.Tensor:
    """s `[B, Hk, T, N1]`, pos `[B, T]` -> block ids `[B, Hk, T, K]` (ascending, -1 padded)."""
    overlap = _overlap_index(g, blocks, s.shape[-1], s.device)  # [NB, W]
    padded = torch.cat([s, s.new_full((*s.shape[:-1], 1), float("-inf"))], dim=-1)
    score = padded[..., overlap].amax(dim=-1)  # [B, Hk, T, NB]
    c = torch.arange(blocks, device=s.device)
    qb = torch.div(pos, g.block_size, rounding_mode="floor")[:, None, :, None]  # [B, 1, T, 1]
    forced = (c < g.init_blocks) | (c >= qb - g.local_blocks)
    score = torch.where(forced, torch.full_like(score, float("inf")), score)
    future = c > qb
    score = score.masked_fill(future, float("-inf"))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :g.budget]
    chosen = torch.where(order > qb, torch.full_like(order, blocks), order)  # future -> sorts last
    chosen = torch.sort(chosen, dim=-1).values
    chosen = torch.where(chosen == blocks, torch.full_like(chosen, -1), chosen)
    if chosen.shape[-1] < g.budget:
        chosen = torch.cat([chosen, chosen.new_full((*chosen.shape[:-1], g.budget - chosen.shape[-1]), -1)], -1)
    return chosen


def infllm_select_blocks_cpu(q: torch.Tensor, kernels: torch.Tensor, coarse: torch.Tensor, kv_lens: torch.Tensor,
                             geometry: InfLLMGeometry, scale: float) -> torch.Tensor:
    """q `[B, T, H, D]`, kernels `[B, N1, Hk, D]`, coarse `[B, N2, Hk, D]`, kv_lens `[B]` -> block ids
    `[B, Hk, T, K]`, in chunks of :data:`QUERY_CHUNK` queries."""
    batch, new, heads, dim = q.shape
    kv_heads = kernels.shape[2]
    # N1 kernels come from a capacity of at most N1*stride + size - 1 keys: enough blocks for any
    # query position (blocks past a query's own are dropped as future)
    longest = kernels.shape[1] * geometry.kernel_stride + geometry.kernel_size - 1
    blocks = -(-longest // geometry.block_size)
    qf = q.float().view(batch, new, kv_heads, heads // kv_heads, dim)
    pos = kv_lens.to(q.device)[:, None] - new + torch.arange(new, device=q.device)[None, :]  # [B, T]
    out = []
    for start in range(0, new, QUERY_CHUNK):
        part = slice(start, start + QUERY_CHUNK)
        s = _kernel_scores(qf[:, part], kernels, coarse, pos[:, part], geometry, scale)
        out.append(_select(s, pos[:, part], geometry, blocks))
    chosen = torch.cat(out, dim=2)
    return chosen.masked_fill((pos < 0)[:, None, :, None], -1)


def block_sparse_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                               kv_lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """q `[B, T, H, D]`, caches `[B, C, Hk, D]`, blocks `[B, Hk, T, K]`, kv_lens `[B]` -> `[B, T, H, D]`.
    Gathers the selected blocks (:data:`GATHER_QUERIES` queries at a time) when they hold fewer
    keys than the cache, else masks the whole cache (both choices depend on shapes only)."""
    new, capacity = q.shape[1], k_cache.shape[1]
    if blocks.shape[-1] * block_size >= capacity:
        return _attend_masked(q, k_cache, v_cache, blocks, kv_lens, block_size, scale)
    parts = []
    for start in range(0, new, GATHER_QUERIES):
        stop = min(start + GATHER_QUERIES, new)
        parts.append(_attend_gathered(q[:, start:stop], k_cache, v_cache, blocks[:, :, start:stop],
                                      kv_lens - (new - stop), block_size, scale))
    return torch.cat(parts, dim=1)


def _attend_gathered(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                     ends: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Per (row, KV head, query): the K*block_size keys of its blocks, gathered from the cache;
    keys past the query (or of -1 blocks) masked, their values zeroed (stale NaN). ``ends`` `[B]`:
    one past the position of each row's last query here (query t sits at ends - T + t)."""
    batch, new, heads, dim = q.shape
    capacity, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    ids = blocks.to(q.device)
    tokens = (ids[..., None] * block_size + torch.arange(block_size, device=q.device)).flatten(-2)  # [B, Hk, T, M]
    pos = ends.to(q.device)[:, None] - new + torch.arange(new, device=q.device)[None, :]  # [B, T]
    valid = (ids >= 0).repeat_interleave(block_size, dim=-1) & (tokens <= pos[:, None, :, None])
    index = tokens.clamp(0, capacity - 1).flatten(2)[..., None].expand(-1, -1, -1, dim)  # [B, Hk, T*M, D]
    keys = k_cache.transpose(1, 2).gather(2, index).view(batch, kv_heads, new, -1, dim).float()
    values = v_cache.transpose(1, 2).gather(2, index).view(batch, kv_heads, new, -1, dim).float()
    keys = keys.masked_fill(~valid[..., None], 0.0)
    values = values.masked_fill(~valid[..., None], 0.0)
    qf = q.float().view(batch, new, kv_heads, group, dim)
    scores = torch.einsum("btkgd,bktmd->bkgtm", qf, keys) * scale
    scores = scores.masked_fill(~valid[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(~valid.any(-1)[:, :, None, :, None], 0.0)
    out = torch.einsum("bkgtm,bktmd->btkgd", probs, values)
    return out.reshape(batch, new, heads, dim).to(q.dtype)


def _attend_masked(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                   kv_lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """The selected blocks as a token mask over the whole capacity (positions past a row's length
    zeroed first: :func:`zero_unused`), attended in query chunks."""
    batch, new, heads, _ = q.shape
    capacity, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    lengths = kv_lens.to(q.device)
    cols = torch.arange(capacity, device=q.device)
    k, v = zero_unused(k_cache, v_cache, lengths)
    pos = lengths[:, None] - new + torch.arange(new, device=q.device)[None, :]  # [B, T]
    count = -(-capacity // block_size)
    out = []
    for start in range(0, new, QUERY_CHUNK):
        part = slice(start, start + QUERY_CHUNK)
        ids = blocks[:, :, part].to(q.device)
        ids = torch.where(ids >= 0, ids, torch.full_like(ids, count))  # -1 -> a dropped extra column
        picked = torch.zeros(*ids.shape[:-1], count + 1, dtype=torch.bool, device=q.device)
        picked.scatter_(-1, ids, True)
        token = picked[..., :count].repeat_interleave(block_size, dim=-1)[..., :capacity]  # [B, Hk, t, C]
        token = token & (cols[None, None, None, :] <= pos[:, None, part, None])
        mask = token.repeat_interleave(group, dim=1)  # [B, H, t, C]
        out.append(_sdpa_masked(q[:, part], k, v, mask, False, scale))
    return torch.cat(out, dim=1)
