from __future__ import annotations

import torch


def linear_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x `[..., K]`, weight `[O, K]` -> x @ weight.T `[..., O]`, float32 accumulate, x.dtype out."""
    return (x.float() @ weight.float().t()).to(x.dtype)


def logits_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x `[..., E]`, weight `[V, E]` -> x @ weight.T `[..., V]` in float32 (not rounded)."""
    return x.float() @ weight.float().t()
