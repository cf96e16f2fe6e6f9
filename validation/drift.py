"""Per-layer hidden-state drift: where along the depth does the device leave the reference?"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def relative_l2(ref: torch.Tensor, dev: torch.Tensor) -> float:
    """``||dev - ref||_2 / ||ref||_2`` over all elements, computed in float64 on the CPU; infinite
    when either state holds NaN or Inf (a non-finite state is a failure, never a skipped one)."""
    if ref.shape != dev.shape:
        raise ValueError(f"shape mismatch: reference {list(ref.shape)} vs device {list(dev.shape)}")
    r = ref.detach().double().cpu()
    d = dev.detach().double().cpu()
    if not (bool(torch.isfinite(r).all()) and bool(torch.isfinite(d).all())):
        return float("inf")
    norm = float(r.norm())
    diff = float((d - r).norm())
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm


def layer_names(count: int) -> list[str]:
    """Names of ``count`` hidden states: ``embedding`` then ``layer 0`` .. ``layer count-2``."""
    return ["embedding"] + [f"layer {i}" for i in range(count - 1)]


def layer_drift(ref_states: Sequence[torch.Tensor], dev_states: Sequence[torch.Tensor]) -> list[float]:
    """Relative L2 per hidden state; both lists hold L+1 tensors ``[B, T, E]`` (embedding first).
    A ``None`` reference entry (not comparable) gives NaN."""
    if len(ref_states) != len(dev_states):
        raise ValueError(f"expected as many reference as device states, "
                         f"got {len(ref_states)} vs {len(dev_states)}")
    return [float("nan") if r is None else relative_l2(r, d) for r, d in zip(ref_states, dev_states)]


@dataclass(frozen=True)
class DriftSummary:
    """Per layer: mean and max drift over prompts; the first layer whose max passes the threshold,
    and the first whose hidden state is non-finite (infinite drift) in some prompt."""

    names: tuple[str, ...]
    mean: tuple[float, ...]
    max: tuple[float, ...]
    threshold: float
    first_over: str | None
    first_non_finite: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "threshold": self.threshold,
            "first_layer_over": self.first_over,
            "first_layer_non_finite": self.first_non_finite,
            "layers": [{"name": n, "index": i, "rel_l2_mean": m, "rel_l2_max": x}
                       for i, (n, m, x) in enumerate(zip(self.names, self.mean, self.max))],
        }


def first_over(values: Sequence[float], threshold: float) -> int | None:
    """Index of the first value strictly above ``threshold`` (NaN is skipped), or None."""
    return next((i for i, v in enumerate(values) if v == v and v > threshold), None)


def summarize_drift(per_prompt: Sequence[Sequence[float]], threshold: float) -> DriftSummary:
    """per_prompt: one :func:`layer_drift` list per prompt (same length)."""
    if not per_prompt:
        raise ValueError("no drift measurements")
    count = len(per_prompt[0])
    columns = [[row[i] for row in per_prompt if row[i] == row[i]] for i in range(count)]
    means = tuple(sum(c) / len(c) if c else float("nan") for c in columns)
    maxes = tuple(max(c) if c else float("nan") for c in columns)
    names = tuple(layer_names(count))
    index = first_over(maxes, threshold)
    broken = next((i for i, m in enumerate(maxes) if m == float("inf")), None)
    return DriftSummary(names, means, maxes, threshold, None if index is None else names[index],
                        None if broken is None else names[broken])
