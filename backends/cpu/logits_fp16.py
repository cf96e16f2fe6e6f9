"""The CPU's fast ``logits`` for bfloat16 / float16 lm_heads ("cpu.fbgemm"): fbgemm's fp16-weight GEMM.

``torch.ops.quantized.linear_dynamic_fp16(x float32 [M, E], packed)`` multiplies float32 activations
by a float16 weight packed once by ``linear_prepack_fp16(W float32 [V, E], None)`` and accumulates and
returns float32 `[M, V]`: what the ``logits`` contract asks (hal/ops.py), without the float32 copy of
the lm_head that ``logits_cpu`` makes chunk by chunk on every call. (torch's CPU build has no bf16
GEMM with a float32 output: ``torch.mm(..., out_dtype=)`` is CUDA-only. oneDNN's
``onednn.linear_dynamic_fp16`` computes the same product but was measured ~20x slower here.)

Exactness: a bfloat16 value has 8 significant bits and float16 11, but float16 spans only 2^-24
(smallest subnormal) to 65504, bfloat16 2^-133 to 3.4e38. :func:`prepare_logits_fp16` multiplies the
weight by ``2^shift`` (chosen so its largest magnitude lands in [2^15, 2^16), the top float16 binade:
every bfloat16 value there is <= 65280 < 65504) and packs it when every value survives the round
trip to float16 exactly (checked on the whole tensor); the output is multiplied by ``2^-shift``
(exact). The weight is then held exactly and the only difference from the reference is the order of
the float32 sums. A weight with values too far below its largest magnitude (any bfloat16 value
at least 2^-32 times the largest is exact: 2^-17 after the scale, where float16's subnormals still
keep 8 significant bits) is refused at prepare and served by the exact chunked float32 path
(:class:`Fp16Refused`, with the reason). float16 weights always pack (scaling a float16 value up by
a power of two that keeps it <= 65504 is exact).

The packed copy is extra memory: 2 bytes per lm_head element (56.6 MB for SmolLM2's [49152, 576]);
the dense tensor stays, since the embedding lookup of a tied lm_head reads it. A token table kept
quantized (a ``hal.quant`` container, ``backends/cpu/table.py``) is packed from its rows decoded
:data:`TABLE_ROWS` at a time into the model dtype (the same packed values as from its dense form);
only the codes stay beside the packed copy, and they serve the rows above :data:`FBGEMM_MAX_ROWS`.

Threads: fbgemm's GEMM runs on torch's intra-op pool (``torch.set_num_threads`` applies; measured
in benchmarks/RESULTS.md, "CPU decode (issue 13)").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from backends.cpu.ops import logits_cpu
from backends.cpu.table import CodesTable
from hal.quant import QuantizedWeight

FP16_TOP_EXPONENT = 15
"""float16's largest binade is [2^15, 2^16) (max 65504): the weight's largest magnitude goes there."""
FBGEMM_MAX_ROWS = 16
"""Up to this many activation rows the packed GEMM runs; above, the chunked float32 path on the
dense tensor (shapes only). Measured on SmolLM2's [49152, 576], load < 1
(``python -m benchmarks.lm_head --rows 1,8,32,128``), chunked / fbgemm ms at 1 thread: 1 row 11.7 / 5.3,
8 rows 17.2 / 9.1, 32 rows 20.7 / 28.6, 128 rows 51.9 / 102.6 (2 threads alike): the crossover lies
between 8 and 32 rows."""
CHECK_ROWS = 4096
"""Rows of the weight checked per step at prepare (keeps the float32 temporaries small)."""
TABLE_ROWS = 512
"""Rows of a quantized table decoded per step at prepare: its temporaries (~5 per step, 1.2 MB each
on SmolLM2) stay small enough that the heap they leave behind after load is small too."""


@dataclass(frozen=True)
class Fp16Packed:
    """fbgemm's packed float16 lm_head: ``packed`` holds ``weight * 2^shift`` exactly, `[V, E]`;
    ``dense`` the weight itself (the model's tensor, not a copy, or the quantized table's
    :class:`CodesTable`: the path above :data:`FBGEMM_MAX_ROWS` rows); ``nbytes`` the bytes
    ``packed`` holds (2 per element, in addition to the dense tensor or the codes)."""

    packed: torch.ScriptObject
    shift: int
    dense: torch.Tensor | CodesTable
    layout = "fbgemm fp16 (exact, scaled by a power of two)"

    @property
    def vocab(self) -> int:
        return self.dense.shape[0]

    @property
    def width(self) -> int:
        return self.dense.shape[1]

    @property
    def nbytes(self) -> int:
        return self.vocab * self.width * 2


@dataclass(frozen=True)
class Fp16Refused:
    """A weight float16 cannot hold exactly: served by the chunked float32 path (``logits_cpu``);
    ``reason`` says why. Holds no extra bytes (``weight`` is the model's own tensor or table)."""

    weight: torch.Tensor | CodesTable
    reason: str
    layout = "dense (chunked float32)"
    nbytes = 0


def quantized_engines() -> list[str]:
    """torch's quantized engines (fbgemm ships with the x86 builds; ARM builds have qnnpack only)."""
    return list(torch.backends.quantized.supported_engines)


def supports(ctx) -> str | None:
    engines = quantized_engines()
    if "fbgemm" not in engines:
        return f"cpu.fbgemm: torch's quantized engines must include fbgemm, got {engines}"
    if ctx.dtype not in (torch.bfloat16, torch.float16):
        return (f"cpu.fbgemm: dtype must be bfloat16 or float16 (float16 cannot hold a float32 lm_head; "
                f"float32 takes cpu.onednn), got {ctx.dtype_name}")
    return None


MAX_SHIFT = 126
"""2^shift and 2^-shift must be normal float32 numbers (a weight whose largest magnitude is below
2^-111 is refused)."""


def fp16_shift(weight: torch.Tensor) -> int:
    """The power of two that puts the largest magnitude of ``weight`` `[V, E]` into float16's top
    binade [2^15, 2^16) (0 for an all-zero weight)."""
    if weight.numel() == 0:
        return 0
    return _shift_for(max(float(weight.max()), -float(weight.min())))  # no |weight| copy


def _shift_for(top: float) -> int:
    """:func:`fp16_shift` of a weight whose largest magnitude is ``top``."""
    if top == 0.0:
        return 0
    _, exponent = math.frexp(top)  # top = m * 2^exponent, m in [0.5, 1)
    return FP16_TOP_EXPONENT - (exponent - 1)


def prepare_logits_fp16(weight: torch.Tensor, ctx=None) -> Fp16Packed | Fp16Refused:
    """lm_head `[V, E]` bfloat16 / float16 -> its exact packed float16 form, or :class:`Fp16Refused`
    with the reason when float16 cannot hold it exactly (module docstring). A ``hal.quant``
    container (a quantized token table): the same, from its rows decoded into ``ctx.dtype``."""
    if isinstance(weight, QuantizedWeight):
        return _prepare_table(CodesTable(weight, ctx.dtype))
    if weight.dtype not in (torch.bfloat16, torch.float16) or weight.dim() != 2:
        return Fp16Refused(weight, f"fbgemm packs 2-d bfloat16 / float16 weights, got {weight.dtype} "
                                   f"{list(weight.shape)}")
    shift = fp16_shift(weight)
    if abs(shift) > MAX_SHIFT:
        return Fp16Refused(weight, f"the largest magnitude needs a scale of 2^{shift}, outside float32's normal "
                                   f"range (|shift| must be <= {MAX_SHIFT})")
    scaled, bad = _scaled_float32(lambda rows: weight[rows], weight.shape, shift, CHECK_ROWS)
    if bad:
        del scaled
        magnitudes = weight.abs()
        low = float(magnitudes[magnitudes > 0].min())
        return Fp16Refused(weight, f"{bad} of {weight.numel()} values would round in float16: magnitudes "
                                   f"{low:.3g}..{float(magnitudes.max()):.3g} span more binades than float16 holds")
    return Fp16Packed(torch.ops.quantized.linear_prepack_fp16(scaled, None), shift, weight)


def _scaled_float32(rows_of, shape: tuple[int, int], shift: int, step: int) -> tuple[torch.Tensor, int]:
    """The float32 ``weight * 2^shift`` `[V, E]` that fbgemm packs, filled ``step`` rows at a time
    from ``rows_of(slice)``, and how many of its values float16 cannot hold exactly (the packed
    copy is used only when none). Measured peak RSS at load on the 0.5b checkpoint in bfloat16
    (weights 971 MiB): 1.50x the weights' bytes when a float32 copy of the table was scaled into
    a second one, 1.33x with this one buffer. fbgemm needs float32 here: given float16 it makes
    a float32 copy of its own (peak +430 MiB for a `[73k, 1k]` table against +144 for float32)."""
    vocab, width = shape
    scaled = torch.empty(vocab, width, dtype=torch.float32)
    bad = 0
    for start in range(0, vocab, step):
        block = scaled[start:start + step]
        block.copy_(rows_of(slice(start, start + step)))
        block.mul_(2.0 ** shift)
        bad += int((block.half().float() != block).sum())
    return scaled, bad


def _prepare_table(table: CodesTable) -> Fp16Packed | Fp16Refused:
    """:func:`prepare_logits_fp16` of ``table``'s dense form without holding it: one pass for the
    shift, one that fills the float32 ``weight * 2^shift`` to pack (freed once packed), both
    :data:`TABLE_ROWS` decoded rows at a time."""
    if table.dtype not in (torch.bfloat16, torch.float16):
        return Fp16Refused(table, f"fbgemm packs bfloat16 / float16 tables, got {table.dtype}")
    vocab, width = table.shape
    chunks = [slice(start, start + TABLE_ROWS) for start in range(0, vocab, TABLE_ROWS)]
    top = 0.0
    for rows in chunks:
        block = table.rows(rows)
        top = max(top, float(block.max()), -float(block.min()))
    shift = _shift_for(top)
    if abs(shift) > MAX_SHIFT:
        return Fp16Refused(table, f"the largest magnitude needs a scale of 2^{shift}, outside float32's normal "
                                  f"range (|shift| must be <= {MAX_SHIFT})")
    scaled, bad = _scaled_float32(table.rows, (vocab, width), shift, TABLE_ROWS)
    if bad:
        return Fp16Refused(table, f"{bad} of {vocab * width} values would round in float16: magnitudes up to "
                                  f"{top:.3g} span more binades than float16 holds")
    return Fp16Packed(torch.ops.quantized.linear_prepack_fp16(scaled, None), shift, table)


def logits_fp16(x: torch.Tensor, weight: Fp16Packed | Fp16Refused | torch.Tensor) -> torch.Tensor:
    """x `[..., E]` @ the prepared lm_head `[V, E]` -> `[..., V]` float32: the packed GEMM up to
    :data:`FBGEMM_MAX_ROWS` rows; ``logits_cpu`` above, and for a dense tensor or a refused weight."""
    if not isinstance(weight, Fp16Packed):
        return logits_cpu(x, weight.weight if isinstance(weight, Fp16Refused) else weight)
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] > FBGEMM_MAX_ROWS:
        return logits_cpu(x, weight.dense)
    flat = flat.float().contiguous()
    out = torch.ops.quantized.linear_dynamic_fp16(flat, weight.packed)
    if weight.shift:
        out.mul_(2.0 ** -weight.shift)
    return out.reshape(*x.shape[:-1], weight.vocab)
