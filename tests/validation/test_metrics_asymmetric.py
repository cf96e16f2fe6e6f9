"""Every metric that feeds report.json (validation/metrics.py: position_metrics and summarize) on
examples where reference and device are NOT interchangeable: different top-1, top-k sets that
overlap only partly, the reference's top-1 in the device's top 5 but not the other way round,
a near tie on one side only. Expected values come from numpy definitions written here (the
README's sentences); each example is first shown to separate the right from the swapped or
mixed-up computation, so a metric that reads the wrong side cannot pass."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from validation import metrics

# token:        0     1     2     3     4     5     6      7      8      9
REF = np.array([.300, .240, .150, .100, .080, .050, .035, .025, .012, .008])
DEV = np.array([.100, .120, .060, .040, .030, .200, .015, .150, .005, .280])
# ref ranks 0 1 2 3 4 ...; dev ranks 9 5 7 1 0 2 3 4 6 8: dev's top-1 (9) is ref's last token,
# ref's top-1 (0) is dev's 5th. Gaps: ref .06, dev .08.
REF2 = np.array([.05, .45, .40, .02, .03, .01, .015, .005, .01, .01])
DEV2 = np.array([.06, .40, .41, .03, .02, .02, .025, .005, .015, .015])
DEV3 = np.array([.330, .200, .170, .090, .070, .060, .035, .025, .012, .008])  # same top-1 as REF


def _top(p: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-p, kind="stable")[:k]]


def np_metrics(ref: np.ndarray, dev: np.ndarray, k: int, margin: float) -> dict:
    """The README's definitions, computed directly."""
    t = int(np.argmax(ref))
    top_ref = _top(ref, k)
    mask = ref > 0
    return {
        "top1_match": int(np.argmax(dev)) == t,
        "top5_inclusion": t in _top(dev, 5),
        "topk_overlap": len(set(top_ref) & set(_top(dev, k))),
        "top1_prob_rel_err": abs(dev[t] - ref[t]) / ref[t],
        "topk_abs_errors": [abs(dev[i] - ref[i]) for i in top_ref],
        "kl": float(np.sum(ref[mask] * np.log(ref[mask] / dev[mask]))),
        "near_tie": (np.sort(ref)[-1] - np.sort(ref)[-2]) < margin,
    }


def _t(p: np.ndarray) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64)


def test_the_examples_separate_reference_from_device():
    right, swapped = np_metrics(REF, DEV, 3, 0.07), np_metrics(DEV, REF, 3, 0.07)
    for key in ("top5_inclusion", "top1_prob_rel_err", "topk_abs_errors", "kl", "near_tie"):
        assert right[key] != swapped[key], key
    # the device's top-k in place of the reference's gives other errors
    assert right["topk_abs_errors"] != [abs(DEV[i] - REF[i]) for i in _top(DEV, 3)]
    assert math.isclose(REF.sum(), 1.0) and math.isclose(DEV.sum(), 1.0)
    assert math.isclose(REF2.sum(), 1.0) and math.isclose(DEV2.sum(), 1.0) and math.isclose(DEV3.sum(), 1.0)


@pytest.mark.parametrize(("ref", "dev"), [(REF, DEV), (DEV, REF), (REF2, DEV2), (DEV2, REF2), (REF, DEV3)],
                         ids=["ref-dev", "dev-ref", "ref2-dev2", "dev2-ref2", "ref-dev3"])
@pytest.mark.parametrize("k", [3, 5])
def test_position_metrics_follow_the_definitions(ref, dev, k):
    want = np_metrics(ref, dev, k, 0.07)
    m = metrics.position_metrics(_t(ref), _t(dev), k, tie_margin=0.07)
    assert (m.ref_top1, m.dev_top1) == (int(np.argmax(ref)), int(np.argmax(dev)))
    assert m.ref_top1_prob == pytest.approx(ref.max()) and m.dev_prob_of_ref_top1 == pytest.approx(dev[ref.argmax()])
    assert m.top1_match == want["top1_match"]
    assert m.top5_inclusion == want["top5_inclusion"]
    assert m.topk_overlap == want["topk_overlap"]
    assert m.top1_prob_rel_err == pytest.approx(want["top1_prob_rel_err"], rel=1e-12)
    assert list(m.topk_abs_errors) == pytest.approx(want["topk_abs_errors"], rel=1e-12)
    assert m.kl == pytest.approx(want["kl"], rel=1e-12)
    assert m.near_tie == want["near_tie"]


def test_hand_values_of_the_first_example():
    m = metrics.position_metrics(_t(REF), _t(DEV), 3, tie_margin=0.07)
    assert (m.ref_top1, m.dev_top1, m.top1_match) == (0, 9, False)
    assert m.top5_inclusion is True  # token 0 is dev's 5th; swapped, token 9 is not in ref's top 5
    assert m.topk_overlap == 0  # {0, 1, 2} vs {9, 5, 7}
    assert m.top1_prob_rel_err == pytest.approx(0.2 / 0.3)  # swapped: 0.2 / 0.1
    assert list(m.topk_abs_errors) == pytest.approx([0.20, 0.12, 0.09])  # tokens 0, 1, 2
    assert m.near_tie is True  # ref's gap .06 < .07 (dev's .08 is not)
    assert metrics.top_inclusion(_t(DEV), _t(REF), 5) is False
    assert metrics.topk_overlap(_t(REF), _t(DEV), 5) == 2  # {0..4} vs {9, 5, 7, 1, 0}


def test_summary_follows_the_definitions():
    pairs = [(REF, DEV), (DEV, REF), (REF2, DEV2), (DEV2, REF2), (REF, DEV3)]
    labels = ["a", "b", "c", "d", "e"]
    k, margin = 3, 0.07
    rows = [metrics.position_metrics(_t(r), _t(d), k, margin) for r, d in pairs]
    s = metrics.summarize(rows, labels, k)
    want = [np_metrics(r, d, k, margin) for r, d in pairs]
    rel = np.array([w["top1_prob_rel_err"] for w in want])
    errs = np.array([e for w in want for e in w["topk_abs_errors"]])
    kls = np.array([w["kl"] for w in want])
    assert s["positions"] == 5
    assert s["top1_match_rate"] == pytest.approx(np.mean([w["top1_match"] for w in want]))
    assert s["top5_inclusion_rate"] == pytest.approx(np.mean([w["top5_inclusion"] for w in want]))
    assert s["top10_overlap_mean"] == pytest.approx(np.mean([w["topk_overlap"] for w in want]))
    assert s["top1_prob_rel_err_mean"] == pytest.approx(rel.mean(), rel=1e-12)
    assert s["top1_prob_rel_err_max"] == pytest.approx(rel.max(), rel=1e-12)
    assert s["top1_prob_rel_err_max_prompt"] == labels[int(rel.argmax())] == "b"
    assert s["top10_prob_mae"] == pytest.approx(errs.mean(), rel=1e-12)
    assert s["top10_prob_max_abs_err"] == pytest.approx(errs.max(), rel=1e-12)
    assert s["top10_prob_rmse"] == pytest.approx(np.sqrt((errs ** 2).mean()), rel=1e-12)
    assert s["kl_mean"] == pytest.approx(kls.mean(), rel=1e-12) and s["kl_max"] == pytest.approx(kls.max())
    assert s["near_ties"] == sum(w["near_tie"] for w in want)
    # the rates are not the trivial 0 or 1 (they would hide a swapped side)
    assert 0 < s["top5_inclusion_rate"] < 1 and 0 < s["top1_match_rate"] < 1


def test_softmax64_is_float64_softmax():
    logits = torch.tensor([2.0, -1.0, 0.5], dtype=torch.bfloat16)
    z = np.array([2.0, -1.0, 0.5])
    assert metrics.softmax64(logits).dtype == torch.float64
    assert metrics.softmax64(logits).numpy() == pytest.approx(np.exp(z) / np.exp(z).sum(), rel=1e-15)
