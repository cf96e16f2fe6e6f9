"""attention_prefill / attention_decode / kv_write on the NPU through
``npu_fused_infer_attention_score`` (FIA) and ``npu_scatter_pa_kv_cache``.

Both attention calls use ``input_layout="TND"`` (tokens of all sequences packed, cumulative q
lengths), GQA through ``num_key_value_heads``, ``scale`` passed explicitly (the op's default is
1.0) and bottom-right causal ``sparse_mode=3`` with the fixed 2048x2048 compressed mask (True =
masked out). Prefill removes left padding (``kv_start``) by packing only each row's real tokens;
queries that see no key get zeros, as the catalogue says.

The model's cache (``model/cache.py``) is `[B, C, Hk, D]` with C a multiple of 128 and each row's
tokens from slot 0 (right-ragged, ``kv_lens``). That buffer *is* a paged cache: viewed as
`[B*C/128, 128, Hk, D]` pages, row b owns pages ``b*C/128 .. (b+1)*C/128 - 1``. kv_write scatters
new tokens into it with ``npu_scatter_pa_kv_cache`` (flat slot ``b*C + slot``) and decode reads it
through FIA with ``block_table = arange(B*C/128).view(B, C/128)`` and per-request
``actual_seq_lengths_kv = kv_lens``: no copy, no allocation of K/V per call.
"""
from __future__ import annotations

import torch

from backends.npu.runtime import torch_npu

BLOCK_SIZE = 128  # FIA paged attention: a multiple of 128 in [128, 512] when q length > 1
_MASKS: dict[torch.device, torch.Tensor] = {}
_TABLES: dict[tuple[torch.device, int, int], torch.Tensor] = {}


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


def _pages(cache: torch.Tensor) -> torch.Tensor:
    """`[B, C, Hk, D]` cache -> its zero-copy page view `[B*C/128, 128, Hk, D]`."""
    batch, capacity, kv_heads, dim = cache.shape
    if capacity % BLOCK_SIZE:
        raise ValueError(f"npu: the KV cache capacity must be a multiple of {BLOCK_SIZE} (paged view), "
                         f"got {capacity}")
    return cache.view(batch * capacity // BLOCK_SIZE, BLOCK_SIZE, kv_heads, dim)


def block_table(batch: int, pages: int, device: torch.device) -> torch.Tensor:
    """``arange(B*pages).view(B, pages)`` int32: row b reads its own cache row's pages (cached)."""
    key = (device, batch, pages)
    if key not in _TABLES:
        _TABLES[key] = torch.arange(batch * pages, dtype=torch.int32, device=device).view(batch, pages)
    return _TABLES[key]


def kv_write_npu(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
    """In place: k/v `[B, T, Hk, D]` token (b, t) into position ``slots[b, t]`` of cache row b
    (`[B, C, Hk, D]`, C a multiple of 128); -1 skips. One ``npu_scatter_pa_kv_cache`` on the page
    view with flat slots ``b*C + slot``."""
    batch, new, kv_heads, dim = k.shape
    capacity = k_cache.shape[1]
    k_pages, v_pages = _pages(k_cache), _pages(v_cache)
    slots = slots.to(k_cache.device)
    flat = (slots + capacity * torch.arange(batch, device=slots.device)[:, None]).reshape(-1)
    k_rows, v_rows = k.reshape(batch * new, kv_heads, dim), v.reshape(batch * new, kv_heads, dim)
    keep = slots.reshape(-1) >= 0
    if not bool(keep.all()):
        index = keep.nonzero().squeeze(1)
        flat, k_rows, v_rows = flat[index], k_rows[index], v_rows[index]
    if flat.numel() == 0:
        return
    torch_npu().npu_scatter_pa_kv_cache(k_rows.contiguous(), v_rows.contiguous(), k_pages, v_pages,
                                        flat.contiguous(), cache_mode="Norm")


def attention_decode_npu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """New queries against the right-ragged cache that already holds their keys: q `[B, T, H, D]`,
    k_cache / v_cache `[B, C, Hk, D]` (bf16/fp16, C a multiple of 128), kv_lens `[B]` ->
    `[B, T, H, D]`. Query t of row b sees keys j <= kv_lens[b] - T + t. FIA reads the cache
    buffers in place through their page view and ``block_table``."""
    batch, new, heads, dim = q.shape
    capacity, kv_heads = k_cache.shape[1], k_cache.shape[2]
    k_pages = _pages(k_cache).view(-1, BLOCK_SIZE, kv_heads * dim)  # BnBsH, zero copy
    v_pages = _pages(v_cache).view(-1, BLOCK_SIZE, kv_heads * dim)
    lengths = [int(n) for n in kv_lens.tolist()]
    rows = [b for b in range(batch) if lengths[b] > 0]
    if not rows:
        return torch.zeros_like(q)
    table = block_table(batch, capacity // BLOCK_SIZE, q.device)
    if len(rows) < batch:
        table = table[torch.tensor(rows, device=q.device)]
    q_lens = [min(new, lengths[b]) for b in rows]  # queries of a short row beyond its keys see none
    index = torch.cat([torch.arange((b + 1) * new - n, (b + 1) * new) for b, n in zip(rows, q_lens)])
    index = index.to(q.device)
    q_t = q.reshape(batch * new, heads, dim)[index].contiguous()
    out, _ = torch_npu().npu_fused_infer_attention_score(
        q_t, k_pages, v_pages, atten_mask=causal_mask(q.device), block_table=table, block_size=BLOCK_SIZE,
        actual_seq_lengths=_cumulative(q_lens), actual_seq_lengths_kv=[lengths[b] for b in rows],
        num_heads=heads, num_key_value_heads=kv_heads, scale=scale, input_layout="TND", sparse_mode=3)
    return _scatter_rows(out, index, batch, new)
