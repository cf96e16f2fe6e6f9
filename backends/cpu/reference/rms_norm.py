from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x `[..., E]`, weight `[E]` -> `[..., E]` in x.dtype.

    Normalise in float32, round to x.dtype, then multiply by the weight (MiniCPM order)."""
    xf = x.float()
    variance = (xf * xf).mean(dim=-1, keepdim=True)
    normed = (xf / torch.sqrt(variance + eps)).to(x.dtype)
    return normed * weight.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual `[..., E]` -> (rms_norm(residual + scale*x), residual + scale*x), x.dtype."""
    new_residual = (residual.float() + scale * x.float()).to(x.dtype)
    return rms_norm_ref(new_residual, weight, eps), new_residual
