"""CPU variants of catalogue ops for the fast decode step (``model/fast_decode.py``): the same
results as the everyday torch ops of ``backends/cpu/ops.py`` in fewer torch calls.

They are registered as ``cpu.decode`` with a priority that never wins a default binding: a model
bound on the CPU keeps ``cpu.torch`` everywhere (the eager path, which the fast step is tested
against), and only :class:`model.fast_decode.DecodeStep` swaps these in. tests/ops checks them
against the float32 reference like every other CPU implementation.

At 135M parameters a decode step of the eager path spends about a third of its time outside
the matrix products (benchmarks/RESULTS.md, "CPU decode (issue 13)"); these two ops were the
largest share of it that needs no change of result.
"""
from __future__ import annotations

import torch

from backends.cpu.ops import _rotate_half_mul, kv_write_cpu, rotary_cpu


def kv_write_decode_cpu(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        slots: torch.Tensor) -> None:
    """kv_write with the slots read on the host (free on the CPU, so not capturable): one token per
    row into one slot shared by every row: a copy into that slot's view of each cache; else, when no
    token is skipped (every decode step, and every prompt without left padding) one ``index_put_``
    per cache, as :func:`~backends.cpu.ops.kv_write_cpu` ends with, without the ~20 calls that
    make its skipped tokens harmless without a host read; otherwise that function."""
    rows = slots.tolist()
    first = rows[0][0] if rows and rows[0] else -1
    if first >= 0 and all(len(row) == 1 and row[0] == first for row in rows):
        # one new token per row, every row into the same slot (every decode step of batch 1 or of
        # an unpadded batch): a copy into the slot's view, no index tensors
        k_cache.select(1, first).copy_(k.select(1, 0))
        v_cache.select(1, first).copy_(v.select(1, 0))
        return
    slots = slots.to(k_cache.device)
    if not bool((slots >= 0).all()):
        kv_write_cpu(k_cache, v_cache, k, v, slots)
        return
    rows = torch.arange(slots.shape[0], device=slots.device)[:, None].expand(slots.shape)
    k_cache.index_put_((rows, slots), k)
    v_cache.index_put_((rows, slots), v)


def _heads_follow(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether k's heads follow q's in one buffer with the same strides (q and k split from one
    fused qkv projection): then one view holds both."""
    same_rows = all(q.stride(d) == k.stride(d) for d in (0, 1) if q.shape[d] > 1)  # size-1 dims: any stride
    return (q.dtype == k.dtype and q.shape[:2] == k.shape[:2] and q.shape[3] == k.shape[3] and same_rows
            and q.stride()[2:] == k.stride()[2:] == (q.shape[3], 1)
            and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
            and k.storage_offset() == q.storage_offset() + q.shape[2] * q.shape[3])


def rotary_decode_cpu(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary in one pass over `[B, T, H + Hk, D]` when k's heads follow q's in memory (the
    model's q and k are views of one qkv output), else :func:`~backends.cpu.ops.rotary_cpu`.
    Element by element the same arithmetic (bitwise the same result); q' and k' are views of
    one output buffer (strided in the head dimension, contiguous in D)."""
    if not _heads_follow(q, k):
        return rotary_cpu(q, k, cos, sin)
    heads = q.shape[2]
    both = q.as_strided((*q.shape[:2], heads + k.shape[2], q.shape[3]), q.stride())
    out = _rotate_half_mul(both, cos.unsqueeze(2), sin.unsqueeze(2))
    return out[:, :, :heads], out[:, :, heads:]
