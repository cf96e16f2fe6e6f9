"""The float32 judges of the InfLLM-v2 ops, written as the sentences of ``hal/ops.py`` with
explicit loops (slow on purpose: per row, KV head and query)."""
from __future__ import annotations

import math

import torch

from hal.sparse import InfLLMGeometry


def infllm_compress_keys_ref(k_cache: torch.Tensor, kv_lens: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """k_cache `[B, C, Hk, D]`, kv_lens `[B]` -> kernels `[B, N, Hk, D]` (means of complete chunks)."""
    batch, capacity, kv_heads, dim = k_cache.shape
    count = max(0, (capacity - size) // stride + 1)
    out = torch.zeros(batch, count, kv_heads, dim, dtype=torch.float32)
    for b in range(batch):
        length = int(kv_lens[b])
        for j in range(count):
            if j * stride + size <= length:
                out[b, j] = k_cache[b, j * stride:j * stride + size].float().mean(dim=0)
    return out.to(k_cache.dtype)


def infllm_append_kernel_ref(kernels: torch.Tensor, k_cache: torch.Tensor, kv_lens: torch.Tensor, size: int,
                             stride: int) -> None:
    """In place: the kernel that row b's last key completes (if any) becomes its chunk's mean."""
    for b in range(k_cache.shape[0]):
        length = int(kv_lens[b])
        if length >= size and (length - size) % stride == 0:
            chunk = k_cache[b, length - size:length].float()
            kernels[b, (length - size) // stride] = chunk.mean(dim=0).to(kernels.dtype)


def _visible(count: int, size: int, stride: int, position: int) -> list[int]:
    return [j for j in range(count) if j * stride + size - 1 <= position]


def infllm_select_blocks_ref(q: torch.Tensor, kernels: torch.Tensor, coarse: torch.Tensor, kv_lens: torch.Tensor,
                             geometry: InfLLMGeometry, scale: float) -> torch.Tensor:
    """q `[B, T, H, D]`, kernels `[B, N1, Hk, D]`, coarse `[B, N2, Hk, D]`, kv_lens `[B]` -> block
    ids `[B, Hk, T, K]` (ascending, -1 padded)."""
    g = geometry
    batch, new, heads, _ = q.shape
    kv_heads = kernels.shape[2]
    group = heads // kv_heads
    out = torch.full((batch, kv_heads, new, g.budget), -1, dtype=torch.int64)
    for b in range(batch):
        for t in range(new):
            p = int(kv_lens[b]) - new + t
            if p < 0:
                continue
            fine = _visible(kernels.shape[1], g.kernel_size, g.kernel_stride, p)
            rough = _visible(coarse.shape[1], g.coarse_size, g.coarse_stride, p)
            qb = p // g.block_size
            for kh in range(kv_heads):
                score = [0.0] * kernels.shape[1]
                for h in range(kh * group, (kh + 1) * group):
                    qh = q[b, t, h].float()
                    norm_keys = coarse[b, rough, kh] if rough else kernels[b, fine, kh]
                    lse = -math.inf
                    if len(norm_keys):
                        lse = float(torch.logsumexp((norm_keys.float() @ qh) * scale, dim=0))
                    for j in fine:
                        score[j] += math.exp(float(kernels[b, j, kh].float() @ qh) * scale - lse)
                blocks = []
                for c in range(qb + 1):
                    if c < g.init_blocks or c >= qb - g.local_blocks:
                        value = math.inf
                    else:
                        value = max((score[j] for j in g.overlapping_kernels(c) if j < len(score)), default=-math.inf)
                    blocks.append((value, c))
                chosen = sorted(blocks, key=lambda item: (-item[0], item[1]))[:g.budget]
                ids = sorted(c for _, c in chosen)
                out[b, kh, t, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


def block_sparse_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                               kv_lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """q `[B, T, H, D]` against the selected blocks of the cache rows -> `[B, T, H, D]`."""
    batch, new, heads, dim = q.shape
    group = heads // k_cache.shape[2]
    out = torch.zeros(batch, new, heads, dim, dtype=torch.float32)
    for b in range(batch):
        for h in range(heads):
            kh = h // group
            for t in range(new):
                last = int(kv_lens[b]) - new + t
                chosen = {int(c) for c in blocks[b, kh, t].tolist() if c >= 0}
                keys = [j for j in range(last + 1) if j // block_size in chosen]
                if not keys:
                    continue  # sees no key: zeros by contract
                scores = (k_cache[b, keys, kh].float() @ q[b, t, h].float()) * scale
                out[b, t, h] = torch.softmax(scores, dim=0) @ v_cache[b, keys, kh].float()
    return out.to(q.dtype)
