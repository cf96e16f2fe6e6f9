"""rms_norm and add_rms_norm on the NPU through ``npu_rms_norm`` / ``npu_add_rms_norm``."""
from __future__ import annotations

import torch

from backends.npu.runtime import torch_npu


def rms_norm_npu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x `[..., E]`, weight `[E]` (x's dtype) -> `[..., E]` in x.dtype (catalogue ``rms_norm``)."""
    return torch_npu().npu_rms_norm(x, weight, eps)[0]


def add_rms_norm_npu(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual `[..., E]` -> (rms_norm(residual + scale*x), residual + scale*x).

    MiniCPM's branch scale (scale_depth/sqrt(L)) is applied to the branch *before* the fused
    add, as ``npu_add_rms_norm`` only adds."""
    branch = x if scale == 1.0 else x * scale
    y, _, new_residual = torch_npu().npu_add_rms_norm(residual, branch, weight, eps)
    return y, new_residual
