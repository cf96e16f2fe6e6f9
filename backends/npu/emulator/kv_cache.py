"""Emulated ``npu_scatter_pa_kv_cache`` (paged KV-cache write)."""
from __future__ import annotations

import torch

from backends.npu.emulator.checks import not_emulated, require, require_contiguous, require_dtype
from backends.npu.emulator.graphs import aclnn_op

OP = "npu_scatter_pa_kv_cache"


@aclnn_op
def npu_scatter_pa_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                            compress_lens: torch.Tensor | None = None,
                            compress_seq_offsets: torch.Tensor | None = None,
                            seq_lens: torch.Tensor | None = None, cache_mode: str = "PA_NZ") -> None:
    """Write token t's key/value into slot ``slot_mapping[t]`` (= block * block_size + offset), in place.

    key/value: `(T, Hk, D)`. key_cache/value_cache: `(num_blocks, block_size, Hk, D)` with
    ``cache_mode="Norm"`` (the default ``"PA_NZ"`` expects the private NZ layout: not emulated).
    slot_mapping: int32/int64 `(T,)`, unique, in range. All contiguous, one dtype."""
    if cache_mode != "Norm":
        raise not_emulated(OP, f"cache_mode={cache_mode!r} (only 'Norm', the plain ND cache)")
    if compress_lens is not None or compress_seq_offsets is not None or seq_lens is not None:
        raise not_emulated(OP, "compressed caches")
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("slot_mapping", slot_mapping)):
        require_contiguous(OP, name, t)
    require_dtype(OP, "slot_mapping", slot_mapping, (torch.int32, torch.int64))
    require(key.dim() == 3 and key.shape == value.shape, OP,
            f"key/value must be (T, Hk, D) of one shape, got {tuple(key.shape)} / {tuple(value.shape)}")
    require(key_cache.dim() == 4 and key_cache.shape == value_cache.shape, OP,
            f"caches must be (num_blocks, block_size, Hk, D) of one shape, got {tuple(key_cache.shape)}")
    require(tuple(key_cache.shape[2:]) == tuple(key.shape[1:]), OP,
            f"cache (Hk, D) {tuple(key_cache.shape[2:])} != key (Hk, D) {tuple(key.shape[1:])}")
    require(key.dtype == value.dtype == key_cache.dtype == value_cache.dtype, OP,
            "key, value and caches must share one dtype")
    require(slot_mapping.shape == (key.shape[0],), OP,
            f"slot_mapping must be ({key.shape[0]},), got {tuple(slot_mapping.shape)}")
    slots = slot_mapping.long()
    capacity = key_cache.shape[0] * key_cache.shape[1]
    require(bool(((slots >= 0) & (slots < capacity)).all()), OP, f"slots must be in [0, {capacity})")
    require(slots.unique().numel() == slots.numel(), OP, "slots must be unique")
    key_cache.view(capacity, *key.shape[1:])[slots] = key
    value_cache.view(capacity, *key.shape[1:])[slots] = value
