"""The token embedding table kept quantized (a GGUF's ``token_embd.weight`` in Q8_0 / Q4_0 / Q4_1,
loaded with ``quantize="keep"``): what the model holds for it and what each op receives.

The table is ``W = container.dequantize().to(dtype)`` `[V, E]` (hal/ops.py, "Quantized token
tables"), the dense tensor a dequantizing load holds. The bound ``embedding`` implementation's
``prepare`` makes its own form of the container once (``cpu.torch``: the codes themselves,
``backends/cpu/table.py``; the reference: the dense decoding); one without such a prepare (cuda,
npu, an override) gets ``W`` decoded at load, and the model then holds a plain dense tensor, as
before. A tied lm_head is the same :class:`PreparedTable`; the ``logits`` implementation prepares
its own form of the container (``model.minicpm.prepare_head``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hal.quant import QuantizedWeight
from hal.registry import BoundOps


@dataclass(frozen=True, eq=False)
class PreparedTable:
    """``container`` (`[V, E]`, on the CPU) as the bound ``embedding`` implementation ``impl``
    prepared it: ``weight`` is what that implementation receives. ``format`` / ``shape`` /
    ``nbytes`` describe the container; ``prepared_bytes`` is what the model holds for it (the
    container plus the prepared form's own bytes)."""

    container: QuantizedWeight
    dtype: torch.dtype
    impl: str
    weight: object

    @property
    def format(self) -> str:
        return self.container.format

    @property
    def shape(self) -> tuple[int, int]:
        return self.container.shape

    @property
    def nbytes(self) -> int:
        return self.container.nbytes

    @property
    def prepared_bytes(self) -> int:
        return self.container.nbytes + int(getattr(self.weight, "nbytes", 0))

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dense(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The table ``W`` `[V, E]` in the model dtype on ``device`` (a new tensor)."""
        return self.container.dequantize().to(device=device, dtype=self.dtype)

    def for_ops(self, ops: BoundOps, op: str) -> object:
        """What ``ops``' ``op`` (``embedding`` or ``logits``) receives for this table: the form
        prepared at load when ``ops`` binds that implementation, else the form ``ops`` prepares
        now (per call: copies of the model with other ops, e.g. benchmarks' chunked lm_head), the
        dense table where its implementation has no prepare for a container."""
        if op == "embedding" and ops.record[op].impl == self.impl:
            return self.weight
        prepared = ops.prepare(op, self.container)
        return self.dense(ops.context.device) if prepared is self.container else prepared


def prepare_embedding(ops: BoundOps, weight, dtype: torch.dtype, device: torch.device):
    """A dense embedding unchanged; a ``hal.quant`` container -> :class:`PreparedTable` (made
    once), or its dense table on ``device`` where the bound ``embedding`` prepares no form of it."""
    if not isinstance(weight, QuantizedWeight):
        return weight
    prepared = ops.prepare("embedding", weight)
    if prepared is weight:
        return weight.dequantize().to(device=device, dtype=dtype)
    if isinstance(prepared, torch.Tensor):
        return prepared.to(device)
    return PreparedTable(weight, dtype, ops.record["embedding"].impl, prepared)
