from __future__ import annotations

import torch


def _causal_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor | None,
                scale: float) -> torch.Tensor:
    """q `[B, T, H, D]`, k/v `[B, S, Hk, D]`; query t sees key j iff start <= j <= S - T + t."""
    batch, new, heads, dim = q.shape
    keys, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = torch.zeros(batch, new, heads, dim, dtype=torch.float32)
    for b in range(batch):
        start = 0 if kv_start is None else int(kv_start[b])
        for h in range(heads):
            kh = h // group
            for t in range(new):
                last = keys - new + t
                if last < start:
                    continue  # sees no key: zeros by contract
                keys_t = k[b, start:last + 1, kh].float()
                vals_t = v[b, start:last + 1, kh].float()
                scores = (keys_t @ q[b, t, h].float()) * scale
                probs = torch.softmax(scores, dim=0)
                out[b, t, h] = probs @ vals_t
    return out.to(q.dtype)


def attention_prefill_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          kv_start: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Causal GQA over the prompt itself: q `[B, T, H, D]`, k/v `[B, T, Hk, D]` -> `[B, T, H, D]`."""
    return _causal_gqa(q, k, v, kv_start, scale)


def attention_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """New queries against a right-ragged cache that already holds their keys: q `[B, T, H, D]`,
    k_cache/v_cache `[B, C, Hk, D]`, kv_lens `[B]` -> `[B, T, H, D]`. Row b reads cache positions
    ``0 .. kv_lens[b]-1`` only; query t sees key j iff ``j <= kv_lens[b] - T + t``."""
    batch, new, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    lengths = [int(n) for n in kv_lens.tolist()]
    out = torch.zeros(batch, new, heads, dim, dtype=torch.float32)
    for b in range(batch):
        for h in range(heads):
            kh = h // group
            for t in range(new):
                last = lengths[b] - new + t
                if last < 0:
                    continue  # sees no key: zeros by contract
                keys_t = k_cache[b, :last + 1, kh].float()
                vals_t = v_cache[b, :last + 1, kh].float()
                scores = (keys_t @ q[b, t, h].float()) * scale
                probs = torch.softmax(scores, dim=0)
                out[b, t, h] = probs @ vals_t
    return out.to(q.dtype)
