from __future__ import annotations

import torch


def kv_write_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
    """In place: k/v `[B, T, Hk, D]` token (b, t) into position ``slots[b, t]`` of cache row b
    (`[B, C, Hk, D]`); slot -1 skips the token."""
    batch, new = slots.shape
    for b in range(batch):
        for t in range(new):
            slot = int(slots[b, t])
            if slot == -1:
                continue
            k_cache[b, slot] = k[b, t]
            v_cache[b, slot] = v[b, t]
