from __future__ import annotations

import torch

from hal.quant import QuantizedWeight


def embedding_ref(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ids `[B, T]` int64, weight `[V, E]` -> `[B, T, E]` (weight dtype): row lookup."""
    return weight[ids]


def prepare_table_ref(weight, ctx) -> torch.Tensor:
    """``prepare`` of the reference embedding and logits: a quantized token table (``hal.quant``
    container `[V, E]`) -> the dense table ``weight.dequantize().to(ctx.dtype)`` the contract
    defines (hal/ops.py); a dense tensor unchanged."""
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize().to(ctx.dtype)
    return weight
