"""Emulated ``npu_rotary_mul`` (torch_npu 2.13/2.14 schema, A2/A3 binary-kernel constraints)."""
from __future__ import annotations

import torch

from backends.npu.emulator.checks import not_emulated, require, require_dtype


def npu_rotary_mul(input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half",
                   rotate: torch.Tensor | None = None) -> torch.Tensor:
    """out = x * r1 + rotate(x) * r2, with r1 = cos and r2 = sin.

    input: 3-D (TND) or 4-D (BSND/BNSD/SBND), D even and < 896. r1/r2: same rank as input,
    each dim 1 or input's (e.g. ``[B, S, 1, D]`` for BSND), last dim D, input's dtype.
    rotary_mode ``'half'``: rotate(x) = cat(-x2, x1) (NeoX); ``'interleave'``: pairs (2i, 2i+1).
    Computed in float32, returned in input.dtype."""
    op = "npu_rotary_mul"
    if rotate is not None:
        raise not_emulated(op, "the rotate matrix")
    require(rotary_mode in ("half", "interleave"), op,
            f"rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
    require(input.dim() in (3, 4), op, f"input must be 3-D or 4-D, got {input.dim()}-D")
    require_dtype(op, "input", input, (torch.float32, torch.float16, torch.bfloat16))
    dim = input.shape[-1]
    require(dim % 2 == 0 and dim < 896, op, f"head dim must be even and < 896, got {dim}")
    for name, r in (("r1", r1), ("r2", r2)):
        require(r.dtype == input.dtype, op,
                f"{name} dtype must equal input dtype {input.dtype}, got {r.dtype}")
        require(r.dim() == input.dim(), op, f"{name} must have input's rank {input.dim()}, got {r.dim()}")
        ok = r.shape[-1] == dim and all(a in (1, b) for a, b in zip(r.shape, input.shape))
        require(ok, op,
                f"{name} shape must broadcast to {tuple(input.shape)} with last dim {dim}, "
                f"got {tuple(r.shape)}")
    x = input.float()
    if rotary_mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    else:
        pairs = x.unflatten(-1, (dim // 2, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x * r1.float() + rotated * r2.float()).to(input.dtype)
