"""How the emulated attention ops read ``atten_mask`` and ``sparse_mode`` (True/1 = masked out).

sparse_mode 0: optional full mask; 1: full mask required; 2 (top-left causal), 3 (bottom-right
causal) and 4 (band anchored bottom-right, ``pre_tokens`` back / ``next_tokens`` forward) take the
fixed 2048x2048 *compressed* mask. The real kernels read the compressed mask by diagonal offset;
the emulator models that as ``masked(i, j) = M[max(-d, 0), max(d, 0)]`` (clamped to 2047) with
``d`` the column's offset right of the causal diagonal. The canonical
``torch.triu(ones(2048, 2048, bool), 1)`` then gives causal attention, and any other mask
(an SDPA-style "True = keep" triangle, all zeros) gives the wrong answer it would give on
hardware, so wrapper bugs are caught by comparing with the reference.
"""
from __future__ import annotations

import torch

from backends.npu.emulator.checks import require, require_dtype

COMPRESSED = 2048
BIG = 2147483647
MASK_DTYPES = (torch.bool, torch.int8, torch.uint8)


def check_compressed(op: str, mask: torch.Tensor | None, sparse_mode: int) -> torch.Tensor:
    require(mask is not None, op,
            f"sparse_mode={sparse_mode} needs the 2048x2048 compressed atten_mask, got None")
    require_dtype(op, "atten_mask", mask, MASK_DTYPES)
    require(tuple(mask.shape) == (COMPRESSED, COMPRESSED), op,
            f"sparse_mode={sparse_mode} needs atten_mask of shape (2048, 2048), got {tuple(mask.shape)}")
    return mask.bool()


def compressed_masked(mask: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """offset `[Sq, Skv]` = j - i - anchor -> masked `[Sq, Skv]` read from the compressed mask."""
    rows = (-offset).clamp(0, COMPRESSED - 1)
    cols = offset.clamp(0, COMPRESSED - 1)
    return mask[rows, cols]


def visible(sq: int, skv: int, sparse_mode: int, mask: torch.Tensor | None, full: torch.Tensor | None,
            pre_tokens: int, next_tokens: int, device: torch.device) -> torch.Tensor:
    """Boolean `[Sq, Skv]`, True where query i may read key j, for one sequence.

    mask: the checked compressed mask (modes 2-4). full: this sequence's `[Sq, Skv]` slice of a
    full mask (modes 0/1), or None."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(skv, device=device)[None, :]
    if sparse_mode in (0, 1):
        keep = torch.ones(sq, skv, dtype=torch.bool, device=device)
        if full is not None:
            keep = ~full.bool()
            if sparse_mode == 0:
                keep = keep & (j - i <= next_tokens) & (i - j <= pre_tokens)
        return keep
    offset = j - i - (0 if sparse_mode == 2 else skv - sq)
    if sparse_mode == 4:  # band: the compressed mask is only checked, pre/next decide
        return (offset <= next_tokens) & (-offset <= pre_tokens)
    return ~compressed_masked(mask, offset)
