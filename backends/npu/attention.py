"""attention_prefill / attention_decode on the NPU through ``npu_fused_infer_attention_score``.

Both calls use ``input_layout="TND"`` (tokens of all sequences packed, cumulative q lengths),
GQA through ``num_key_value_heads``, ``scale`` passed explicitly (the op's default is 1.0) and
bottom-right causal ``sparse_mode=3`` with the fixed 2048x2048 compressed mask (True = masked out).
Left padding (``kv_start``) is removed by packing only each row's real tokens; queries that see
no key get zeros, as the catalogue says.

Decode reads the model's dense cache (`[B, S, Hk, D]` views) through a paged cache: each row's
real keys/values are written with ``npu_scatter_pa_kv_cache`` into 128-token blocks and FIA reads
them through ``block_table`` with per-request ``actual_seq_lengths_kv``. That costs one copy of
the cache per call; a KVCache that allocates the paged layout itself would remove it.
"""
from __future__ import annotations

import math

import torch

from backends.npu.runtime import torch_npu

BLOCK_SIZE = 128  # FIA paged attention: a multiple of 128 in [128, 512] when q length > 1
_MASKS: dict[torch.device, torch.Tensor] = {}


def causal_mask(device: torch.device) -> torch.Tensor:
    """The compressed causal mask for sparse_mode 2/3/4: `[2048, 2048]` bool, True above the diagonal."""
    if device not in _MASKS:
        _MASKS[device] = torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=device), diagonal=1)
    return _MASKS[device]


def _starts(kv_start: torch.Tensor | None, batch: int) -> list[int]:
    return [0] * batch if kv_start is None else [int(s) for s in kv_start.tolist()]


def _cumulative(lengths: list[int]) -> list[int]:
    ends, total = [], 0
    for n in lengths:
        total += n
        ends.append(total)
    return ends


def _scatter_rows(packed: torch.Tensor, index: torch.Tensor, batch: int, new: int) -> torch.Tensor:
    """packed `[n, H, D]` rows at flat positions ``index`` of `[B*T]` -> `[B, T, H, D]`, zeros elsewhere."""
    out = packed.new_zeros(batch * new, *packed.shape[1:])
    out[index] = packed
    return out.view(batch, new, *packed.shape[1:])


def attention_prefill_npu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor | None,
                          scale: float) -> torch.Tensor:
    """Causal GQA over the prompt: q `[B, T, H, D]`, k/v `[B, T, Hk, D]` (bf16/fp16), kv_start `[B]`
    int64 or None -> `[B, T, H, D]`. Query t of row b sees keys kv_start[b] <= j <= t."""
    batch, new, heads, dim = q.shape
    kv_heads = k.shape[2]
    starts = _starts(kv_start, batch)
    rows = [b for b in range(batch) if starts[b] < new]
    lengths = [new - starts[b] for b in rows]
    if not rows:
        return torch.zeros_like(q)
    index = torch.cat([torch.arange(b * new + starts[b], (b + 1) * new) for b in rows]).to(q.device)
    flat = (q.reshape(batch * new, heads, dim), k.reshape(batch * new, kv_heads, dim),
            v.reshape(batch * new, kv_heads, dim))
    q_t, k_t, v_t = (t[index].contiguous() for t in flat)
    ends = _cumulative(lengths)
    out, _ = torch_npu().npu_fused_infer_attention_score(
        q_t, k_t, v_t, atten_mask=causal_mask(q.device), actual_seq_lengths=ends, actual_seq_lengths_kv=ends,
        num_heads=heads, num_key_value_heads=kv_heads, scale=scale, input_layout="TND", sparse_mode=3)
    return _scatter_rows(out, index, batch, new)


def attention_decode_npu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         kv_start: torch.Tensor | None, scale: float) -> torch.Tensor:
    """New queries against the cache that already holds their keys: q `[B, T, H, D]`, k_cache /
    v_cache `[B, S, Hk, D]` (bf16/fp16) -> `[B, T, H, D]`. Query t of row b sees keys
    kv_start[b] <= j <= S - T + t."""
    tnpu = torch_npu()
    batch, new, heads, dim = q.shape
    keys, kv_heads = k_cache.shape[1], k_cache.shape[2]
    starts = _starts(kv_start, batch)
    rows = [b for b in range(batch) if starts[b] < keys]
    if not rows:
        return torch.zeros_like(q)
    kv_lens = [keys - starts[b] for b in rows]
    q_lens = [min(new, n) for n in kv_lens]
    per_row = math.ceil(max(kv_lens) / BLOCK_SIZE)
    blocks = len(rows) * per_row
    paged_k = k_cache.new_zeros(blocks, BLOCK_SIZE, kv_heads, dim)
    paged_v = v_cache.new_zeros(blocks, BLOCK_SIZE, kv_heads, dim)
    slots = torch.cat([r * per_row * BLOCK_SIZE + torch.arange(n) for r, n in enumerate(kv_lens)])
    slots = slots.to(q.device)
    tnpu.npu_scatter_pa_kv_cache(
        torch.cat([k_cache[b, starts[b]:] for b in rows]).contiguous(),
        torch.cat([v_cache[b, starts[b]:] for b in rows]).contiguous(),
        paged_k, paged_v, slots, cache_mode="Norm")
    block_table = torch.arange(blocks, dtype=torch.int32, device=q.device).view(len(rows), per_row)
    index = torch.cat([torch.arange((b + 1) * new - n, (b + 1) * new) for b, n in zip(rows, q_lens)])
    index = index.to(q.device)
    q_t = q.reshape(batch * new, heads, dim)[index].contiguous()
    out, _ = tnpu.npu_fused_infer_attention_score(
        q_t, paged_k.view(blocks, BLOCK_SIZE, kv_heads * dim),
        paged_v.view(blocks, BLOCK_SIZE, kv_heads * dim),
        atten_mask=causal_mask(q.device), block_table=block_table, block_size=BLOCK_SIZE,
        actual_seq_lengths=_cumulative(q_lens), actual_seq_lengths_kv=kv_lens,
        num_heads=heads, num_key_value_heads=kv_heads, scale=scale, input_layout="TND", sparse_mode=3)
    return _scatter_rows(out, index, batch, new)
