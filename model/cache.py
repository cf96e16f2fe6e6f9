"""Explicit cache objects. ``KVCache`` is the per-layer key/value cache, right-ragged per row."""
from __future__ import annotations

import torch

from hal.errors import InputError
from hal.sparse import InfLLMGeometry

KV_BLOCK = 128
"""The cache capacity is a multiple of this: the NPU reads each cache row as 128-token pages
(FIA ``block_table``, ``npu_scatter_pa_kv_cache``) through a view, without copying."""


def round_capacity(tokens: int) -> int:
    """``tokens`` rounded up to a multiple of :data:`KV_BLOCK` (at least one block)."""
    return max(1, -(-tokens // KV_BLOCK)) * KV_BLOCK


class KVCache:
    """Per-layer keys and values, preallocated, vLLM-style: each row's real tokens from slot 0.

    keys[l], values[l]: `[B, capacity, Hk, D]`, contiguous; capacity is the asked one rounded up
    to a multiple of :data:`KV_BLOCK`. ``lengths`` (CPU int64 `[B]`): how many positions of each
    row are filled (left padding of a prompt is never written, so rows differ). ``length``: how
    many input columns (padding included) have been fed, the same for every row.

    A forward pass asks :meth:`plan` for the slots of its T new tokens, writes every layer with
    ``ops.kv_write(keys[l], values[l], k, v, slots)``, then calls :meth:`advance`.

    MiniCPM-SALA's lightning layers (``lightning_layers``) keep no keys or values (None there)
    but a recurrent state ``states[l]``: `[B, lightning_heads, D, D]` float32, zeros at the start,
    overwritten in place by each forward (its address never changes: decode graphs rely on it).

    With an InfLLM-v2 ``sparse`` geometry, each attention layer also keeps its semantic kernels,
    ``kernels[l]`` `[B, N1, Hk, D]` and ``coarse[l]`` `[B, N2, Hk, D]` (N from the capacity), kept
    up to date with the keys by every forward (recomputed by a multi-token one, one kernel
    appended per decode step), so sparse decode reads them instead of recompressing the cache.
    """

    def __init__(self, layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, lightning_layers: frozenset[int] = frozenset(),
                 lightning_heads: int = 0, sparse: InfLLMGeometry | None = None):
        self.capacity = round_capacity(capacity)
        shape = (batch, self.capacity, kv_heads, head_dim)
        attention = [i not in lightning_layers for i in range(layers)]
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) if a else None for a in attention]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) if a else None for a in attention]
        state = (batch, lightning_heads, head_dim, head_dim)
        self.states = {i: torch.zeros(state, dtype=torch.float32, device=device) for i in sorted(lightning_layers)}
        self.sparse = sparse
        self.kernels: dict[int, torch.Tensor] = {}
        self.coarse: dict[int, torch.Tensor] = {}
        if sparse is not None:
            for i in (i for i, a in enumerate(attention) if a):
                fine, rough = sparse.kernels(self.capacity), sparse.kernels(self.capacity, coarse=True)
                self.kernels[i] = torch.zeros(batch, fine, kv_heads, head_dim, dtype=dtype, device=device)
                self.coarse[i] = torch.zeros(batch, rough, kv_heads, head_dim, dtype=dtype, device=device)
        self.batch = batch
        self.length = 0
        self.lengths = torch.zeros(batch, dtype=torch.int64)
        self._pending: torch.Tensor | None = None

    def plan(self, new: int, kv_start: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots of the next ``new`` columns: returns (slots `[B, T]` int64 on the CPU, -1 for a
        left-padding token; kv_lens `[B]` int64 on the CPU, the filled lengths once they are
        written). kv_start: `[B]` first real column per row (left padding), or None."""
        columns = torch.arange(self.length, self.length + new, dtype=torch.int64)
        columns = columns[None].expand(self.batch, new)
        if kv_start is not None:
            columns = columns - kv_start.to("cpu", torch.int64)[:, None]
        slots = torch.where(columns >= 0, columns, torch.full_like(columns, -1))
        kv_lens = (columns[:, -1] + 1).clamp(min=0)
        if int(kv_lens.max()) > self.capacity:
            raise InputError(f"KVCache: writing {new} tokens after {self.lengths.tolist()} exceeds "
                             f"capacity {self.capacity}")
        self._pending = kv_lens
        return slots, kv_lens

    def advance(self, tokens: int) -> None:
        """Commit the last :meth:`plan` of ``tokens`` columns (all layers written)."""
        self.length += tokens
        if self._pending is not None:
            self.lengths = self._pending
            self._pending = None
