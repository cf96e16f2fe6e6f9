"""Accuracy metrics on next-token distributions: plain functions, no model, no I/O.

A distribution is a float tensor ``[V]`` of probabilities (or logits where named). "ref" is the
float32 reference, "dev" the device under test. Every per-position metric compares the device
at the tokens the *reference* ranks highest, so a swapped token is seen as a probability error.

NaN or Inf in either distribution is a failure of every metric, never a dropped entry: no
match, no inclusion, overlap 0, infinite errors and KL, no near-tie (which would excuse a
mismatch). A NaN model (poisoned weights, float16 overflow) can therefore never pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


def finite(*tensors: torch.Tensor) -> bool:
    """True when every tensor holds only finite values."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def softmax64(logits: torch.Tensor) -> torch.Tensor:
    """logits ``[..., V]`` (any float dtype) -> probabilities ``[..., V]`` float64."""
    return torch.softmax(logits.double(), dim=-1)


def top1_prob_rel_err(p_ref: float, p_dev: float) -> float:
    """``|p_dev - p_ref| / p_ref``: relative error of the reference top-1 token's probability."""
    if not (math.isfinite(p_ref) and math.isfinite(p_dev)):
        return math.inf
    if p_ref <= 0:
        raise ValueError(f"reference probability must be > 0, got {p_ref}")
    return abs(p_dev - p_ref) / p_ref


def topk_overlap(ref: torch.Tensor, dev: torch.Tensor, k: int) -> int:
    """Number of tokens in both top-k sets (0..k). ref/dev: ``[V]``."""
    return _topk_overlap(ref, dev, k) if finite(ref, dev) else 0


def _topk_overlap(ref: torch.Tensor, dev: torch.Tensor, k: int) -> int:
    a = set(torch.topk(ref, k).indices.tolist())
    b = set(torch.topk(dev, k).indices.tolist())
    return len(a & b)


def top_inclusion(ref: torch.Tensor, dev: torch.Tensor, k: int = 5) -> bool:
    """Whether the reference top-1 token is among the device's top-k tokens."""
    return _top_inclusion(ref, dev, k) if finite(ref, dev) else False


def _top_inclusion(ref: torch.Tensor, dev: torch.Tensor, k: int) -> bool:
    return int(ref.argmax()) in torch.topk(dev, k).indices.tolist()


def kl_divergence(p_ref: torch.Tensor, p_dev: torch.Tensor, eps: float = 1e-30) -> float:
    """KL(ref || dev) in nats over the full vocabulary. p_ref/p_dev: ``[V]`` probabilities."""
    return _kl_divergence(p_ref, p_dev, eps) if finite(p_ref, p_dev) else math.inf


def _kl_divergence(p_ref: torch.Tensor, p_dev: torch.Tensor, eps: float = 1e-30) -> float:
    p = p_ref.double()
    q = p_dev.double().clamp_min(eps)
    mask = p > 0
    return float((p[mask] * (p[mask].log() - q[mask].log())).sum().clamp_min(0.0))


def near_tie(p_ref: torch.Tensor, margin: float) -> bool:
    """True when the reference's top-1 and top-2 probabilities differ by less than ``margin``."""
    return _near_tie(p_ref, margin) if finite(p_ref) else False


def _near_tie(p_ref: torch.Tensor, margin: float) -> bool:
    top2 = torch.topk(p_ref, 2).values
    return float(top2[0] - top2[1]) < margin


def topk_abs_errors(p_ref: torch.Tensor, p_dev: torch.Tensor, k: int) -> list[float]:
    """``|p_dev[t] - p_ref[t]|`` for the reference's top-k tokens t, best first (k values)."""
    return _topk_abs_errors(p_ref, p_dev, k) if finite(p_ref, p_dev) else [math.inf] * k


def _topk_abs_errors(p_ref: torch.Tensor, p_dev: torch.Tensor, k: int) -> list[float]:
    idx = torch.topk(p_ref, k).indices
    return (p_dev.double()[idx] - p_ref.double()[idx]).abs().tolist()


@dataclass(frozen=True)
class PositionMetrics:
    """The per-position numbers a summary is built from (see :func:`position_metrics`)."""

    ref_top1: int
    dev_top1: int
    ref_top1_prob: float
    dev_prob_of_ref_top1: float
    top1_match: bool
    top5_inclusion: bool
    topk_overlap: int
    topk_abs_errors: tuple[float, ...]
    kl: float
    near_tie: bool
    ref_margin: float = 0.0
    top2_swing: float = 0.0

    @property
    def top1_prob_rel_err(self) -> float:
        return top1_prob_rel_err(self.ref_top1_prob, self.dev_prob_of_ref_top1)


def position_metrics(p_ref: torch.Tensor, p_dev: torch.Tensor, k: int, tie_margin: float) -> PositionMetrics:
    """Every per-position metric for one pair of distributions ``[V]`` (probabilities).
    ref_margin: reference p(top-1) - p(top-2). top2_swing: |dev - ref| at the reference's top-1
    plus the same at its top-2 (how far this pair moved towards a swap)."""
    ref_top1 = int(p_ref.argmax())
    (p1, p2), (t1, t2) = (v.tolist() for v in torch.topk(p_ref, 2))
    ref_finite = finite(p_ref)  # checked once here: the metrics' own checks scan the [V] tensors again
    both = ref_finite and finite(p_dev)
    return PositionMetrics(
        ref_top1=ref_top1,
        dev_top1=int(p_dev.argmax()),
        ref_top1_prob=float(p_ref[ref_top1]),
        dev_prob_of_ref_top1=float(p_dev[ref_top1]),
        top1_match=int(p_dev.argmax()) == ref_top1 and both,
        top5_inclusion=_top_inclusion(p_ref, p_dev, 5) if both else False,
        topk_overlap=_topk_overlap(p_ref, p_dev, k) if both else 0,
        topk_abs_errors=tuple(_topk_abs_errors(p_ref, p_dev, k) if both else [math.inf] * k),
        kl=_kl_divergence(p_ref, p_dev) if both else math.inf,
        near_tie=_near_tie(p_ref, tie_margin) if ref_finite else False,
        ref_margin=p1 - p2,
        top2_swing=abs(float(p_dev[t1]) - p1) + abs(float(p_dev[t2]) - p2),
    )


def mismatch_rate(rows: Sequence[PositionMetrics], tie_margin: float) -> float:
    """Fraction of rows whose top-1 differs from the reference's while the reference's top-1 leads
    its top-2 by at least ``tie_margin`` (a swap that is not a near-tie)."""
    return mean([float(not r.top1_match and r.ref_margin >= tie_margin) for r in rows])


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def rmse(values: Sequence[float]) -> float:
    return math.sqrt(mean([v * v for v in values])) if values else float("nan")


def summarize(rows: Sequence[PositionMetrics], labels: Sequence[str], k: int) -> dict[str, object]:
    """The report's summary over compared positions (``labels[i]`` names row i, e.g. its prompt).

    Keys: top1_match_rate, top5_inclusion_rate, top10_overlap_mean (mean count out of ``k``),
    top1_prob_rel_err_mean / _max / _max_prompt, top10_prob_mae / _max_abs_err / _rmse (over
    the reference's top-k tokens of every row), kl_mean, kl_max, near_ties, positions."""
    if len(rows) != len(labels):
        raise ValueError(f"expected one label per row, got {len(labels)} labels for {len(rows)} rows")
    if not rows:
        raise ValueError("cannot summarize zero positions")
    rel = [r.top1_prob_rel_err for r in rows]
    worst = max(range(len(rows)), key=lambda i: rel[i])
    abs_errs = [e for r in rows for e in r.topk_abs_errors]
    kls = [r.kl for r in rows]
    return {
        "positions": len(rows),
        "top1_match_rate": mean([float(r.top1_match) for r in rows]),
        "top5_inclusion_rate": mean([float(r.top5_inclusion) for r in rows]),
        "top10_overlap_mean": mean([float(r.topk_overlap) for r in rows]),
        "top1_prob_rel_err_mean": mean(rel),
        "top1_prob_rel_err_max": rel[worst],
        "top1_prob_rel_err_max_prompt": labels[worst],
        "top10_prob_mae": mean(abs_errs),
        "top10_prob_max_abs_err": max(abs_errs),
        "top10_prob_rmse": rmse(abs_errs),
        "kl_mean": mean(kls),
        "kl_max": max(kls),
        "near_ties": sum(r.near_tie for r in rows),
    }


# -- over a corpus (validation/corpus.py) -------------------------------------------------------

def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) with linear interpolation between order statistics (numpy's
    default): sorted x, h = (n - 1) q, x[floor h] + (h - floor h) (x[floor h + 1] - x[floor h])."""
    if not values:
        return float("nan")
    xs = sorted(values)
    h = (len(xs) - 1) * q
    low = math.floor(h)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (h - low) * (xs[high] - xs[low])


def distribution(values: Sequence[float]) -> dict[str, float]:
    """mean, median, p99, p99_9 and max of ``values`` (e.g. per-token KL divergences)."""
    return {"mean": mean(values), "median": quantile(values, 0.5), "p99": quantile(values, 0.99),
            "p99_9": quantile(values, 0.999), "max": max(values) if values else float("nan")}


def perplexity(nll: Sequence[float]) -> float:
    """exp(mean negative log-likelihood in nats) of the observed tokens."""
    return math.exp(mean(nll)) if nll else float("nan")


@dataclass(frozen=True)
class TokenScores:
    """Per scored corpus position (row i predicts token ``target[i]``): each model's NLL of the
    target, KL(ref || dev), both top-1 ids and the reference top-1 token's probabilities."""

    ref_nll: torch.Tensor
    dev_nll: torch.Tensor
    kl: torch.Tensor
    ref_top1: torch.Tensor
    dev_top1: torch.Tensor
    ref_top1_prob: torch.Tensor
    dev_prob_of_ref_top1: torch.Tensor


def token_scores(ref_logits: torch.Tensor, dev_logits: torch.Tensor, target: torch.Tensor) -> TokenScores:
    """ref_logits / dev_logits `[N, V]` (any float dtype), target `[N]` int64 -> float64 scores `[N]`."""
    lr = torch.log_softmax(ref_logits.double(), dim=-1)
    ld = torch.log_softmax(dev_logits.double(), dim=-1)
    pr = lr.exp()
    kl = (pr * (lr - ld)).sum(-1).clamp_min(0.0)
    rows = torch.arange(target.shape[0])
    ref_top1 = lr.argmax(-1)
    return TokenScores(ref_nll=-lr[rows, target], dev_nll=-ld[rows, target], kl=kl, ref_top1=ref_top1,
                       dev_top1=ld.argmax(-1), ref_top1_prob=pr[rows, ref_top1],
                       dev_prob_of_ref_top1=ld[rows, ref_top1].exp())
