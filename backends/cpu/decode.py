"""CPU variants of catalogue ops for the fast decode step (``model/fast_decode.py``): the same
results as the everyday torch ops of ``backends/cpu/ops.py`` in fewer torch calls.

They are registered as ``cpu.decode`` with a priority that never wins a default binding: a model
bound on the CPU keeps ``cpu.torch`` everywhere (the eager path, which the fast step is tested
against), and only :class:`model.fast_decode.DecodeStep` swaps these in. tests/ops checks them
against the float32 reference like every other CPU implementation.

At 135M parameters a decode step of the eager path spends about a third of its time outside
the matrix products (benchmarks/RESULTS.md, "CPU decode (issue 13)"); these two ops were the
largest share of it that needs no change of result. :class:`RotaryStep` is the step's own
rotary: the tables every layer of one step shares are derived once per step, not per layer.
"""
from __future__ import annotations

import torch

from backends.cpu.ops import attention_decode_cpu, kv_write_cpu


def kv_write_decode_cpu(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        slots: torch.Tensor) -> None:
    """kv_write with the slots read on the host (free on the CPU, so not capturable): one token per
    row into one slot shared by every row: a copy into that slot's view of each cache; else, when no
    token is skipped (every decode step, and every prompt without left padding) one ``index_put_``
    per cache, as :func:`~backends.cpu.ops.kv_write_cpu` ends with, without the ~20 calls that
    make its skipped tokens harmless without a host read; otherwise that function."""
    _write(k_cache, v_cache, k, v, slots.tolist(), slots)


def _write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           rows: list[list[int]], slots: torch.Tensor) -> int | None:
    """:func:`kv_write_decode_cpu` with the slots read (``rows``); returns the slot every row's one
    token went to, or None (several tokens per row, or rows in different slots)."""
    first = rows[0][0] if rows and rows[0] else -1
    if first >= 0 and all(len(row) == 1 and row[0] == first for row in rows):
        # one new token per row, every row into the same slot (every decode step of batch 1 or of
        # an unpadded batch): k/v `[B, 1, Hk, D]` copied into the slot's `[B, 1, Hk, D]` view
        k_cache.narrow(1, first, 1).copy_(k)
        v_cache.narrow(1, first, 1).copy_(v)
        return first
    slots = slots.to(k_cache.device)
    if not bool((slots >= 0).all()):
        kv_write_cpu(k_cache, v_cache, k, v, slots)
        return None
    index = torch.arange(slots.shape[0], device=slots.device)[:, None].expand(slots.shape)
    k_cache.index_put_((index, slots), k)
    v_cache.index_put_((index, slots), v)
    return None


class Float32Cache:
    """float32 copies of a bfloat16 / float16 KV cache's buffers for the decode step's attention.

    :func:`~backends.cpu.ops.attention_decode_cpu` computes in float32 (softmax and both products,
    one rounding at the end), so in every layer of every step it converts the first
    ``max(kv_lens)`` positions of both buffers: work that grows with the context. Here each
    buffer `[B, C, Hk, D]` has a float32 copy holding ``buffer.float()`` (an exact conversion) over
    its first ``synced`` positions: :meth:`kv_write` writes the new token into the copy too,
    :meth:`attention_decode` converts only positions the copy does not hold yet (the prompt, at
    the first step) and passes the copies to ``attention_decode_cpu``, which then converts
    nothing: the same float32 values, so bitwise the same result.

    The copies only know what went through :meth:`kv_write`: whoever writes the cache otherwise
    (``model.forward`` on it) calls :meth:`forget` (``DecodeStep`` does when the cache's length is
    not where its last step left it). A copy is allocated with ``torch.empty`` at the buffer's
    capacity (memory pages are used as positions are filled: 2x the cache's bytes at most).
    One per :class:`model.fast_decode.DecodeStep` (not shared between threads)."""

    def __init__(self):
        self._copies: dict[int, list] = {}  # id(buffer) -> [buffer, float32 copy, synced]

    def forget(self) -> None:
        """The copies hold nothing known any more (the cache was written elsewhere)."""
        for entry in self._copies.values():
            entry[2] = 0

    def _entry(self, buffer: torch.Tensor) -> list:
        entry = self._copies.get(id(buffer))
        if entry is None or entry[0] is not buffer:
            entry = [buffer, torch.empty(buffer.shape, dtype=torch.float32, device=buffer.device), 0]
            self._copies[id(buffer)] = entry
        return entry

    def kv_write(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
        """:func:`kv_write_decode_cpu`, and the same token into the float32 copies."""
        rows = slots.tolist()
        slot = _write(k_cache, v_cache, k, v, rows, slots)
        if k_cache.dtype == torch.float32:
            return
        for buffer in (k_cache, v_cache):
            entry = self._entry(buffer)
            if slot is None:  # several slots: the copy is known up to the lowest one written
                entry[2] = min([entry[2]] + [s for row in rows for s in row if s >= 0])
            elif slot <= entry[2]:
                entry[1].narrow(1, slot, 1).copy_(buffer.narrow(1, slot, 1))
                entry[2] = max(entry[2], slot + 1)

    def attention_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
        """:func:`~backends.cpu.ops.attention_decode_cpu` over the float32 copies (a float32
        cache: over the cache itself)."""
        longest = max(kv_lens.tolist(), default=0)
        if k_cache.dtype == torch.float32 or longest <= 0:
            return attention_decode_cpu(q, k_cache, v_cache, kv_lens, scale)
        copies = []
        for buffer in (k_cache, v_cache):
            entry = self._entry(buffer)
            if entry[2] < longest:
                known = entry[2]
                entry[1].narrow(1, known, longest - known).copy_(buffer.narrow(1, known, longest - known))
                entry[2] = longest
            copies.append(entry[1])
        return attention_decode_cpu(q, *copies, kv_lens, scale)


def _heads_follow(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether k's heads follow q's in one buffer with the same strides (q and k split from one
    fused qkv projection): then one view holds both."""
    d = q.shape[3]
    if q.dtype != k.dtype or q.shape[:2] != k.shape[:2] or k.shape[3] != d \
            or q.stride()[2:] != (d, 1) or k.stride()[2:] != (d, 1):
        return False
    if any(q.stride(i) != k.stride(i) for i in (0, 1) if q.shape[i] > 1):  # size-1 dims: any stride
        return False
    return (k.data_ptr() == q.data_ptr() + q.shape[2] * d * q.element_size()
            and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr())


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) `[B, T, 1, D]` from the catalogue's cos/sin `[B, T, D]`: signed sin is
    ``[-sin[:D/2] | sin[D/2:]]``, so that ``rotate_half(x) * sin == swap_halves(x) * signed``
    element by element, bitwise (``(-a) * b`` and ``a * (-b)`` are the same float)."""
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(2), signed.unsqueeze(2)


def _rotate_signed(x: torch.Tensor, cos: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x `[B, T, H, D]` (in float32, one rounding to x's
    dtype; :func:`~backends.cpu.ops._rotate_half_mul` computes the same values) with the halves
    swapped by one ``roll`` instead of chunk, neg and cat."""
    float32 = x.dtype == torch.float32
    xf = x if float32 else x.float()
    out = (xf * cos).add_(torch.roll(xf, xf.shape[-1] // 2, -1).mul_(signed))
    return out if float32 else out.to(x.dtype)


def rotary_prepared(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, signed: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary with :func:`rotary_tables`' tables: one pass over `[B, T, H + Hk, D]` when k's heads
    follow q's in memory (the model's q and k are views of one qkv output; q' and k' are then
    views of one output buffer, strided in the head dimension, contiguous in D), else two."""
    if not _heads_follow(q, k):
        return _rotate_signed(q, cos, signed), _rotate_signed(k, cos, signed)
    heads = q.shape[2]
    both = q.as_strided((*q.shape[:2], heads + k.shape[2], q.shape[3]), q.stride())
    q_out, k_out = _rotate_signed(both, cos, signed).split((heads, k.shape[2]), dim=2)
    return q_out, k_out


def rotary_decode_cpu(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary as :func:`~backends.cpu.ops.rotary_cpu` computes it (bitwise the same values) in
    fewer calls: :func:`rotary_prepared` on :func:`rotary_tables`."""
    return rotary_prepared(q, k, *rotary_tables(cos, sin))


class RotaryStep:
    """:func:`rotary_decode_cpu` for the layers of one decode step: they all receive the step's
    cos/sin tensors, so their :func:`rotary_tables` are made at the first call with those very
    tensors (an identity check, no value read) and reused; other tensors get tables of their own.
    One per :class:`model.fast_decode.DecodeStep` (not shared between threads)."""

    def __init__(self):
        self._cos = self._sin = self._tables = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if cos is not self._cos or sin is not self._sin:
            self._cos, self._sin, self._tables = cos, sin, rotary_tables(cos, sin)
        return rotary_prepared(q, k, *self._tables)
