"""Per-head decay rates of MiniCPM-SALA's lightning layers: the ALiBi slope recipe of SALA's
``_build_slope_tensor`` (research/sala_spec.md §5.2), the same in every layer. Head h decays by
``exp(-slope_h)`` per token."""
from __future__ import annotations

import math

import torch


def _power_of_two(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (h + 1) for h in range(n)]


def alibi_slopes(heads: int) -> torch.Tensor:
    """`[heads]` float32: ``2^(-8(h+1)/H)`` for H a power of two (0.84 .. 0.0039 for 32 heads);
    otherwise the closest lower power of two, then every other slope of twice that count."""
    if math.log2(heads).is_integer():
        return torch.tensor(_power_of_two(heads), dtype=torch.float32)
    closest = 2 ** math.floor(math.log2(heads))
    extra = alibi_slopes(2 * closest).tolist()[0::2][:heads - closest]
    return torch.tensor(_power_of_two(closest) + extra, dtype=torch.float32)
