"""Attention as plain torch code on the NPU (``npu.torch``): serves what FIA does not take
(float32 activations, head dims other than 64/128). Explicit scores, mask and softmax in float32."""
from __future__ import annotations

import torch

from backends.cpu.ops import zero_unused


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    """q `[B, T, H, D]`, k/v `[B, S, Hk, D]` -> `[B, T, H, D]`; query t sees kv_start <= j <= S - T + t."""
    batch, new, heads, _ = q.shape
    keys, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    kf = k.float().repeat_interleave(group, dim=2)
    vf = v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), kf) * scale
    cols = torch.arange(keys, device=q.device)
    last = keys - new + torch.arange(new, device=q.device)
    keep = (cols[None, :] <= last[:, None])[None].expand(batch, new, keys)
    if kv_start is not None:
        keep = keep & (cols[None, None, :] >= kv_start.to(q.device)[:, None, None])
    scores = scores.masked_fill(~keep[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(~keep.any(-1)[:, None, :, None], 0.0)
    return torch.einsum("bhts,bshd->bthd", probs, vf).to(q.dtype)


def attention_prefill_npu_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                kv_start: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Catalogue ``attention_prefill``: q `[B, T, H, D]`, k/v `[B, T, Hk, D]` -> `[B, T, H, D]`."""
    return _attend(q, k, v, kv_start, scale)


def _attend_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """q `[B, T, H, D]` against cache rows k/v `[B, S, Hk, D]` (S >= every length): query t of row b
    sees keys j <= lengths[b] - T + t; a query that sees none gives zeros."""
    new, heads = q.shape[1], q.shape[2]
    group = heads // k.shape[2]
    kf = k.float().repeat_interleave(group, dim=2)
    vf = v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), kf) * scale
    cols = torch.arange(k.shape[1], device=q.device)
    last = lengths[:, None] - new + torch.arange(new, device=q.device)[None, :]  # [B, T]
    keep = cols[None, None, :] <= last[:, :, None]
    scores = scores.masked_fill(~keep[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(~keep.any(-1)[:, None, :, None], 0.0)
    return torch.einsum("bhts,bshd->bthd", probs, vf).to(q.dtype)


def attention_decode_npu_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Catalogue ``attention_decode``: q `[B, T, H, D]`, caches `[B, C, Hk, D]`, kv_lens `[B]` ->
    `[B, T, H, D]`; reads ``[:max(kv_lens)]`` and masks each row's positions past its length."""
    lengths = kv_lens.to(q.device)
    longest = int(lengths.max())
    if longest <= 0:
        return torch.zeros_like(q)
    return _attend_cache(q, k_cache[:, :longest], v_cache[:, :longest], lengths, scale)


def attention_decode_full_npu_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                    kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The same over the whole capacity C: no host read of kv_lens, so an NPUGraph can capture it
    (FIA takes its lengths as host lists); the cost is C keys per row. Positions past a row's
    length are zeroed first (``zero_unused``)."""
    k, v = zero_unused(k_cache, v_cache, kv_lens)
    return _attend_cache(q, k, v, kv_lens.to(q.device), scale)
