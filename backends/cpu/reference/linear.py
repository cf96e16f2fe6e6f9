from __future__ import annotations

import torch


def linear_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x `[..., K]`, weight `[O, K]` -> x @ weight.T `[..., O]`, float32 accumulate, x.dtype out."""
    return (x.float() @ weight.float().t()).to(x.dtype)


def logits_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x `[..., E]`, weight `[V, E]` -> x @ weight.T `[..., V]` in float32 (not rounded)."""
    return x.float() @ weight.float().t()


def quantized_linear_ref(x: torch.Tensor, weight) -> torch.Tensor:
    """x `[..., K]`, weight a ``hal.quant`` container `[O, K]` -> x @ weight.dequantize().T
    `[..., O]`: the exact float32 decoding, float32 accumulate, x.dtype out."""
    return (x.float() @ weight.dequantize().to(x.device).t()).to(x.dtype)


linear_int4_ref = linear_int8_ref = linear_ternary_ref = quantized_linear_ref
