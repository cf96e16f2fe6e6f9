"""Emulated ``npu_rms_norm`` and ``npu_add_rms_norm`` (torch_npu 2.13/2.14 schemas)."""
from __future__ import annotations

import torch

from backends.npu.emulator.checks import require, require_dtype
from backends.npu.emulator.graphs import aclnn_op

_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16
# (x dtype, gamma dtype) pairs accepted on Atlas A2/A3
_RMS_NORM_PAIRS = {(_F16, _F32), (_BF16, _F32), (_F16, _F16), (_BF16, _BF16), (_F32, _F32)}


def _normalise(xf: torch.Tensor, gamma: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    dims = tuple(range(xf.dim() - gamma.dim(), xf.dim()))
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return xf * rstd * gamma.float(), rstd


@aclnn_op
def npu_rms_norm(input: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x / sqrt(mean(x^2 over gamma's dims) + epsilon) * gamma.

    input: 2 to 8 dims. gamma: the trailing dims of input. Returns (y in input.dtype,
    rstd float32 of shape ``input.shape[:-gamma.ndim] + (1,) * gamma.ndim``)."""
    op = "npu_rms_norm"
    require(2 <= input.dim() <= 8, op, f"input must have 2 to 8 dims, got {input.dim()}")
    require(tuple(gamma.shape) == tuple(input.shape[input.dim() - gamma.dim():]), op,
            f"gamma shape must equal the trailing dims of input {tuple(input.shape)}, "
            f"got {tuple(gamma.shape)}")
    pair = (input.dtype, gamma.dtype)
    require(pair in _RMS_NORM_PAIRS, op, f"(input, gamma) dtypes must be one of A2/A3 pairs, got {pair}")
    y, rstd = _normalise(input.float(), gamma, epsilon)
    return y.to(input.dtype), rstd


@aclnn_op
def npu_add_rms_norm(x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_sum = x1 + x2; y = rms_norm(x_sum) * gamma. Returns (y, rstd float32, x_sum).

    x1, x2: same shape and dtype (fp32/fp16/bf16), 1 to 8 dims, not empty. gamma: x1's dtype.
    The sum is kept in float32 for the norm and rounded once for ``x_sum``."""
    op = "npu_add_rms_norm"
    require_dtype(op, "x1", x1, (_F32, _F16, _BF16))
    require(x1.shape == x2.shape, op,
            f"x1 and x2 must have one shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    require(x1.dtype == x2.dtype == gamma.dtype, op,
            f"x1, x2 and gamma must share one dtype, got {x1.dtype}, {x2.dtype}, {gamma.dtype}")
    require(1 <= x1.dim() <= 8, op, f"x1 must have 1 to 8 dims, got {x1.dim()}")
    require(x1.numel() > 0, op, "empty tensors are not supported")
    require(tuple(gamma.shape) == tuple(x1.shape[x1.dim() - gamma.dim():]), op,
            f"gamma shape must equal the trailing dims of x1 {tuple(x1.shape)}, got {tuple(gamma.shape)}")
    total = x1.float() + x2.float()
    y, rstd = _normalise(total, gamma, epsilon)
    return y.to(x1.dtype), rstd, total.to(x1.dtype)
