"""A token table `[V, E]` kept quantized on the CPU: the prepared form that ``cpu.torch``'s
``embedding`` and ``logits`` (and ``cpu.fbgemm``'s rows above its packed GEMM) read instead of a
dense tensor (hal/ops.py, "Quantized token tables").

A GGUF's ``token_embd.weight`` is usually Q8_0 (also Q4_0 / Q4_1): kept as its ``hal.quant``
container, the tied embedding / lm_head costs ~1.06 bytes per value (Q8_0) instead of 2 (bf16).
The table the ops compute with is ``W = weight.dequantize().to(dtype)``, the dense tensor a
dequantizing load holds (``model/gguf_checkpoint.py``): a lookup decodes only its rows, the
logits decode :data:`backends.cpu.ops.LOGITS_ROWS_PER_CHUNK` vocabulary rows at a time into the
float32 scratch buffer that ``logits_cpu`` fills from a bf16 tensor, so no dense copy of the table
is ever held.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hal.quant import QuantizedWeight


@dataclass(frozen=True, eq=False)
class CodesTable:
    """``weight`` a ``hal.quant`` container `[V, E]` (codes and scales, on the CPU) read as the
    ``dtype`` table ``weight.dequantize().to(dtype)``. ``nbytes`` is 0: it holds nothing beside
    the container (which the model counts once)."""

    weight: QuantizedWeight
    dtype: torch.dtype
    layout = "quantized codes, rows decoded on use"
    nbytes = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    def rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Rows ``index`` (int64 `[n]` or a slice) of the table, `[n, E]` in ``dtype``: bitwise
        ``weight.dequantize().to(dtype)[index]``."""
        decoded = self.weight.dequantize_rows(index)
        return decoded if self.dtype == torch.float32 else decoded.to(self.dtype)

    def rows_into(self, rows: slice, out: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
        """``out`` float32 `[n, E]` = ``self.rows(rows)`` upcast (bitwise), decoded in place
        (``hal.quant``'s :meth:`~hal.quant.QuantizedWeight.dequantize_rows_into`), then one round
        trip through ``scratch`` (`[>= n, E]` in ``dtype``) for the rounding to the model dtype.
        Saves ~1/3 of the chunked logits' decode time over ``out.copy_(self.rows(rows))`` (no
        temporaries)."""
        n = out.shape[0]
        self.weight.dequantize_rows_into(rows, out)
        if self.dtype != torch.float32:
            rounded = scratch[:n] if scratch is not None else torch.empty(out.shape, dtype=self.dtype)
            rounded.copy_(out)
            out.copy_(rounded)


def prepare_table(weight, ctx):
    """``prepare`` of ``cpu.torch``'s embedding and logits: a ``hal.quant`` container -> its
    :class:`CodesTable` in a bfloat16 / float16 model, its dense float32 decoding in a float32
    one; a dense tensor unchanged. (float32 keeps its single GEMM over the dense table,
    ``logits_cpu``: the chunked products would sum in another order than the dense model, which
    the float32 judge and the safetensors conversion of a GGUF match bit for bit, and decoding
    every chunk per call would slow it down.)"""
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize() if ctx.dtype == torch.float32 else CodesTable(weight, ctx.dtype)
    return weight


def embedding_table(ids: torch.Tensor, table: CodesTable) -> torch.Tensor:
    """ids `[B, T]` int64 -> `[B, T, E]` in the table's dtype: the looked-up rows decoded."""
    return table.rows(ids.reshape(-1)).reshape(*ids.shape, table.shape[1])
