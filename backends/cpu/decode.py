"""CPU variants of catalogue ops for the fast decode step (``model/fast_decode.py``): the same
results as the everyday torch ops of ``backends/cpu/ops.py`` in fewer torch calls.

They are registered as ``cpu.decode`` with a priority that never wins a default binding: a model
bound on the CPU keeps ``cpu.torch`` everywhere (the eager path, which the fast step is tested
against), and only :class:`model.fast_decode.DecodeStep` swaps these in. tests/ops checks them
against the float32 reference like every other CPU implementation.

At 135M parameters a decode step of the eager path spends about a third of its time outside
the matrix products (benchmarks/RESULTS.md, "CPU decode (issue 13)"). Two variants keep state
(:data:`PER_STEP`: the step binds a fresh instance of their class instead of the function):
:class:`RotaryStep` derives the tables every layer of one step shares once per step, and
:class:`Float32Cache` keeps float32 copies of a bfloat16 / float16 cache across steps.
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
    rows = slots.tolist()
    first = rows[0][0] if rows and rows[0] else -1
    if first >= 0 and all(len(row) == 1 and row[0] == first for row in rows):
        # one new token per row, every row into the same slot (every decode step of batch 1 or of
        # an unpadded batch): k/v `[B, 1, Hk, D]` copied into the slot's `[B, 1, Hk, D]` view
        k_cache.narrow(1, first, 1).copy_(k)
        v_cache.narrow(1, first, 1).copy_(v)
        return
    slots = slots.to(k_cache.device)
    if not bool((slots >= 0).all()):
        kv_write_cpu(k_cache, v_cache, k, v, slots)
        return
    rows = torch.arange(slots.shape[0], device=slots.device)[:, None].expand(slots.shape)
    k_cache.index_put_((rows, slots), k)
    v_cache.index_put_((rows, slots), v)


class Float32Cache:
    """attention_decode over float32 copies of a bfloat16 / float16 KV cache, kept across steps.

    :func:`~backends.cpu.ops.attention_decode_cpu` computes in float32 (softmax and both products,
    one rounding at the end), so in every layer of every step it converts the first
    ``max(kv_lens)`` positions of both buffers: work that grows with the context. Here each
    buffer `[B, C, Hk, D]` gets a float32 copy (``torch.empty`` at the buffer's capacity: memory
    pages are used as positions are filled, 2x the cache's bytes at most) that holds
    ``buffer.float()`` (an exact conversion) over positions ``0 .. max(kv_lens)-1``; a call
    converts, per row, only the positions from the row's length at the previous call on (the
    prompt at the first step, then the token kv_write just stored, and a shorter row's padding
    tail up to the longest row) and passes the copies to ``attention_decode_cpu``, which then
    converts nothing: the same float32 values, so bitwise the same result.

    The copies assume positions below a row's previous length are not rewritten: whoever
    rewrites them (a cache rewound by hand and refilled) calls :meth:`forget`; ``DecodeStep``
    does whenever the cache's length is not where its last step left it. One per
    ``DecodeStep`` (not shared between threads)."""

    def __init__(self):
        self._copies: dict[int, list] = {}  # id(buffer) -> [buffer, float32 copy, rows' lengths held]

    def forget(self) -> None:
        """Treat every copy as empty (the cache may have been rewritten)."""
        for entry in self._copies.values():
            entry[2] = [0] * len(entry[2])

    def _copy(self, buffer: torch.Tensor, lengths: list[int], longest: int) -> torch.Tensor:
        entry = self._copies.get(id(buffer))
        if entry is None or entry[0] is not buffer:
            entry = [buffer, torch.empty(buffer.shape, dtype=torch.float32, device=buffer.device),
                     [0] * buffer.shape[0]]
            self._copies[id(buffer)] = entry
        copy, held = entry[1], entry[2]
        if len(set(held)) == 1:  # every row from the same position (batch 1, unpadded batches)
            start = min(held[0], longest)
            copy.narrow(1, start, longest - start).copy_(buffer.narrow(1, start, longest - start))
        else:
            for row, start in enumerate(held):
                start = min(start, longest)
                copy[row].narrow(0, start, longest - start).copy_(buffer[row].narrow(0, start, longest - start))
        entry[2] = [min(n, longest) for n in lengths]
        return copy

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
        lengths = kv_lens.tolist()
        longest = max(lengths, default=0)
        if k_cache.dtype == torch.float32 or longest <= 0:
            return attention_decode_cpu(q, k_cache, v_cache, kv_lens, scale)
        return attention_decode_cpu(q, self._copy(k_cache, lengths, longest), self._copy(v_cache, lengths, longest),
                                    kv_lens, scale)


def attention_decode_copies_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """attention_decode through a fresh :class:`Float32Cache` (each call converts what it reads;
    the decode step keeps one across steps: :data:`PER_STEP`)."""
    return Float32Cache()(q, k_cache, v_cache, kv_lens, scale)


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


PER_STEP = {rotary_decode_cpu: RotaryStep, attention_decode_copies_cpu: Float32Cache}
"""What :class:`model.fast_decode.DecodeStep` binds instead of these registered functions: a
fresh instance of the class per step object, called as the op (same values, state kept across
layers or steps)."""
