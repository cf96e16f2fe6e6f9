from __future__ import annotations

import torch


def linear_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x `[..., K]`, weight `[O, K]` -> x @ weight.T `[..., O]`, float32 accumulate, x.dtype out."""
    return (x.float() @ weight.float().t()).to(x.dtype)


def logits_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x `[..., E]`, weight `[V, E]` -> x @ weight.T `[..., V]` in float32 (not rounded)."""
    return x.float() @ weight.float().t()


def quantized_linear_ref(x: torch.Tensor, weight) -> torch.Tensor:
    """x `[..., K]`, weight a ``hal.quant`` container `[O, K]` (or its float32 decoding, what
    :func:`prepare_quantized_ref` binds) -> x @ weight.dequantize().T `[..., O]`: the exact float32
    decoding, float32 accumulate, x.dtype out."""
    w = weight if isinstance(weight, torch.Tensor) else weight.dequantize()
    return (x.float() @ w.to(x.device).t()).to(x.dtype)


def prepare_quantized_ref(weight, ctx) -> torch.Tensor:
    """The container's exact float32 decoding `[O, K]`, made once at bind time (decoding on every
    call made the reference model ~5 s per forward on SmolLM2-135M)."""
    return weight.dequantize()


linear_int4_ref = linear_int8_ref = linear_ternary_ref = quantized_linear_ref
