"""Explicit cache objects. ``KVCache`` is the dense per-layer key/value cache."""
from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values, preallocated.

    keys[l], values[l]: `[B, capacity, Hk, D]`, contiguous in D. ``length`` positions are filled
    (the same for every row; left padding is expressed by ``kv_start`` in the attention ops).
    """

    def __init__(self, layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, capacity, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity = capacity
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v `[B, T, Hk, D]` at positions ``length .. length+T-1`` of ``layer``; returns
        the filled views `[B, length+T, Hk, D]`. Call :meth:`advance` once all layers are written."""
        end = self.length + k.shape[1]
        if end > self.capacity:
            raise ValueError(f"KVCache: writing {k.shape[1]} tokens at {self.length} exceeds capacity {self.capacity}")
        self.keys[layer][:, self.length:end] = k
        self.values[layer][:, self.length:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def advance(self, tokens: int) -> None:
        self.length += tokens
