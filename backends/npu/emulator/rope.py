"""Emulated ``npu_rotary_mul`` (torch_npu 2.13/2.14 schema, A2/A3 binary-kernel constraints)."""
from __future__ import annotations

import torch

from backends.npu.emulator.checks import not_emulated, require, require_dtype
from backends.npu.emulator.graphs import aclnn_op


def _broadcast_shapes(shape: tuple[int, ...]) -> set[tuple[int, ...]]:
    """The r1/r2 shapes the op documents for an input of ``shape`` read as TND (3-D) or BSND (4-D)."""
    if len(shape) == 3:
        t, n, d = shape
        return {(t, 1, d), (t, n, d)}
    b, s, n, d = shape
    return {(1, s, 1, d), (b, s, 1, d), (b, s, n, d)}  # 1S1D, BS1D, BSND


@aclnn_op
def npu_rotary_mul(input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half",
                   rotate: torch.Tensor | None = None) -> torch.Tensor:
    """out = x * r1 + rotate(x) * r2, with r1 = cos and r2 = sin.

    input: 3-D (TND) or 4-D, read as BSND (the layout this backend passes; the op's BNSD / SBND
    readings of a 4-D input are not emulated), D even and < 896. r1/r2: input's dtype and rank,
    values in [-1, 1] (``torch_npu-npu_rotary_mul.md:93-96``), in a documented broadcast shape:
    ``1S1D``, ``BS1D`` or ``BSND`` for BSND; ``T1D`` or ``TND`` for TND. rotary_mode ``'half'``: rotate(x) = cat(-x2, x1) (NeoX); ``'interleave'``: pairs
    (2i, 2i+1). Computed in float32, returned in input.dtype."""
    op = "npu_rotary_mul"
    if rotate is not None:
        raise not_emulated(op, "the rotate matrix")
    require(rotary_mode in ("half", "interleave"), op,
            f"rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
    require(input.dim() in (3, 4), op, f"input must be 3-D or 4-D, got {input.dim()}-D")
    require_dtype(op, "input", input, (torch.float32, torch.float16, torch.bfloat16))
    dim = input.shape[-1]
    require(dim % 2 == 0 and dim < 896, op, f"head dim must be even and < 896, got {dim}")
    allowed = _broadcast_shapes(tuple(input.shape))
    for name, r in (("r1", r1), ("r2", r2)):
        require(r.dtype == input.dtype, op,
                f"{name} dtype must equal input dtype {input.dtype}, got {r.dtype}")
        require(r.dim() == input.dim(), op, f"{name} must have input's rank {input.dim()}, got {r.dim()}")
        require(tuple(r.shape) in allowed, op,
                f"{name} shape {tuple(r.shape)} is not a documented broadcast of input {tuple(input.shape)} "
                f"(allowed: {sorted(allowed)})")
        if r.numel():
            low, high = float(r.min()), float(r.max())
            require(-1.0 <= low and high <= 1.0, op,
                    f"{name} values must lie in [-1, 1], got [{low:.6g}, {high:.6g}]")
    x = input.float()
    if rotary_mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    else:
        pairs = x.unflatten(-1, (dim // 2, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x * r1.float() + rotated * r2.float()).to(input.dtype)
