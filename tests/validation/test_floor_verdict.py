"""The floor verdict on hand-made numbers: limits at the boundary, the minimum floor, the largest
floor wins, NaN never passes, factor overrides; and the floor implementations themselves."""
from __future__ import annotations

import math

import pytest
import torch

import hal
from validation import floor, metrics
from validation.passrule import TIE_FACTOR, FLOOR_RULES, FloorRule, Thresholds, judge_metric, tie_margin, verdict

RULE = FloorRule("kl_mean", "KL", 4.0, 1e-9, "test")


def test_at_the_limit_passes_and_just_over_fails():
    floors = {"rounded-ops": 2.5e-4}
    at = judge_metric(RULE, 4.0, 1e-3, floors)  # 4 x 2.5e-4 = 1e-3 exactly
    assert at.passed and at.limit == pytest.approx(1e-3) and at.ratio == pytest.approx(4.0)
    over = judge_metric(RULE, 4.0, 1e-3 * (1 + 1e-9), floors)
    assert not over.passed and over.ratio > 4.0


def test_the_largest_floor_is_the_floor_and_is_named():
    m = judge_metric(RULE, 4.0, 3e-4, {"weights": 0.0, "rounded-ops": 1e-4, "cpu-bfloat16": 2e-4})
    assert (m.floor, m.floor_source) == (2e-4, "cpu-bfloat16")
    assert m.limit == pytest.approx(8e-4) and m.ratio == pytest.approx(1.5) and m.passed


def test_a_zero_floor_uses_the_minimum():
    m = judge_metric(RULE, 4.0, 3e-9, {"weights": 0.0})
    assert m.limit == pytest.approx(4e-9) and m.passed and m.ratio == pytest.approx(3.0)
    assert not judge_metric(RULE, 4.0, 5e-9, {"weights": 0.0}).passed


def test_zero_floor_and_zero_minimum_allow_exactly_zero():
    rule = FloorRule("top1_mismatch_rate", "top-1", 1.0, 0.0, "test")
    assert judge_metric(rule, 1.0, 0.0, {"weights": 0.0}).passed
    bad = judge_metric(rule, 1.0, 1 / 35, {"weights": 0.0})
    assert not bad.passed and math.isinf(bad.ratio)
    # one floor mismatch allows one on the device, not two
    assert judge_metric(rule, 1.0, 1 / 35, {"rounded-ops": 1 / 35}).passed
    assert not judge_metric(rule, 1.0, 2 / 35, {"rounded-ops": 1 / 35}).passed


def test_nan_never_passes():
    assert not judge_metric(RULE, 4.0, float("nan"), {"weights": 1e-4}).passed
    assert not judge_metric(RULE, 4.0, 1e-4, {"weights": float("nan")}).passed


def test_verdict_fails_on_any_metric_and_overrides_move_the_factor():
    floors = {"rounded-ops": {"kl_mean": 1e-4, "top1_prob_rel_err_mean": 0.01, "top1_mismatch_rate": 0.0}}
    kl_factor = next(r.factor for r in FLOOR_RULES if r.metric == "kl_mean")
    device = {"kl_mean": 1e-4 * kl_factor * 1.01, "top1_prob_rel_err_mean": 0.01, "top1_mismatch_rate": 0.0}
    v = verdict(device, floors, Thresholds())
    assert not v.passed and len(v.failures) == 1 and v.failures[0].startswith("KL")
    assert [m.metric for m in v.metrics] == [r.metric for r in FLOOR_RULES]
    assert verdict(device, floors, Thresholds(kl_mean_factor=kl_factor * 1.02)).passed


def test_tie_margin_follows_the_floor_swing():
    assert tie_margin(0.02, 0.004) == 0.02  # the fixed margin when the floor moves little
    assert tie_margin(0.02, 0.03) == pytest.approx(TIE_FACTOR * 0.03)


def test_mismatch_rate_counts_swaps_outside_the_margin_only():
    def row(match, margin):
        return metrics.PositionMetrics(0, 0 if match else 1, 0.5, 0.5, match, True, 10, (), 0.0, False, margin)

    rows = [row(True, 0.5), row(False, 0.01), row(False, 0.05), row(False, 0.2)]
    assert metrics.mismatch_rate(rows, 0.02) == 0.5
    assert metrics.mismatch_rate(rows, 0.06) == 0.25
    assert metrics.mismatch_rate(rows, 0.05) == 0.5  # at the margin: counted


def test_rounded_ops_round_every_floating_output_but_logits(tiny_checkpoint):
    judge = hal.load_model(tiny_checkpoint, "cpu", "float32", reference=True)
    ops = floor.rounded_ops(judge.ops, torch.bfloat16)
    x = torch.randn(2, 3, judge.config.hidden_size)
    w = torch.randn(judge.config.hidden_size)
    y = ops.rms_norm(x, w, 1e-5)
    assert y.dtype == torch.float32 and torch.equal(y, y.to(torch.bfloat16).float())
    # independent: the same normalisation written here, rounded once
    expect = (x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w).to(torch.bfloat16).float()
    assert torch.allclose(y, expect, rtol=1e-2, atol=1e-2)
    logits = ops.logits(x, judge.embed)
    assert not torch.equal(logits, logits.to(torch.bfloat16).float())  # float32 logits stay float32
    # the tiny checkpoint is stored in bfloat16: rounding changes nothing, so no copy is made
    rounded = floor.weights_rounded(judge, torch.bfloat16)
    assert rounded.layers[0].qkv is judge.layers[0].qkv and floor.shares_weights(rounded, judge)
    judge.layers[0].qkv = judge.layers[0].qkv * (1 + 2 ** -12)  # no longer bfloat16 values
    before = judge.layers[0].qkv.clone()
    rounded = floor.weights_rounded(judge, torch.bfloat16)
    assert rounded.layers[0].qkv is not judge.layers[0].qkv and not floor.shares_weights(rounded, judge)
    assert torch.equal(rounded.layers[0].qkv, before.to(torch.bfloat16).float())
    assert torch.equal(judge.layers[0].qkv, before)  # the judge is untouched


def test_cached_protocol_matches_one_full_forward(tiny_checkpoint):
    """Prefill + decode steps give the logits of one forward over the whole sequence (float32)."""
    model = hal.load_model(tiny_checkpoint, "cpu", "float32")
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 3]])
    logits, hidden = floor.run_cached(model, ids, 4)
    full = model.forward(ids, output_hidden_states=True)
    assert torch.allclose(logits, full.logits[0], atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(hidden, full.hidden_states))
