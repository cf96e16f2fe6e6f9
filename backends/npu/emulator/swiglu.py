"""Emulated ``npu_swiglu``."""
from __future__ import annotations

import torch

from backends.npu.emulator.checks import require, require_contiguous, require_dtype
from backends.npu.emulator.graphs import aclnn_op


@aclnn_op
def npu_swiglu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Split ``input`` in halves A (first) and B (second) along ``dim``; return A*sigmoid(A)*B.

    input: 1 to 8 dims, contiguous, fp32/fp16/bf16; the split dim must be even. Computed in
    float32, returned in input.dtype with the split dim halved."""
    op = "npu_swiglu"
    require_dtype(op, "input", input, (torch.float32, torch.float16, torch.bfloat16))
    require(1 <= input.dim() <= 8, op, f"input must have 1 to 8 dims, got {input.dim()}")
    require_contiguous(op, "input", input)
    size = input.shape[dim]
    require(size % 2 == 0, op, f"the split dim must be even, got {size}")
    a, b = input.float().chunk(2, dim=dim)
    return (a * torch.sigmoid(a) * b).to(input.dtype)
