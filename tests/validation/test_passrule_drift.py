"""The pass rule (near-ties, strict mean threshold, overrides) and per-layer drift."""
from __future__ import annotations

import math

import pytest
import torch

from hal.errors import InputError
from validation.drift import first_over, layer_drift, relative_l2, summarize_drift
from validation.passrule import Check, Thresholds, parse_overrides, seed_rule, verdict


FLOOR = {"rounded-ops": {"kl_mean": 1e-4, "top1_prob_rel_err_mean": 0.01, "top1_mismatch_rate": 0.0}}
GOOD = {"kl_mean": 1e-4, "top1_prob_rel_err_mean": 0.01, "top1_mismatch_rate": 0.0}


def test_near_tie_mismatch_is_a_note_not_a_failure():
    checks = [Check("p1", True, False), Check("p2", False, True, "ref 'a' vs dev 'b'")]
    v = verdict(GOOD, FLOOR, Thresholds(), checks)
    assert v.passed
    assert not v.failures
    assert any("near-tie" in n and "p2" in n for n in v.notes)


def test_real_mismatch_over_the_floor_fails_and_is_listed():
    device = dict(GOOD, top1_mismatch_rate=1 / 35)
    v = verdict(device, FLOOR, Thresholds(), [Check("prompt 3 position 7", False, False)])
    assert not v.passed
    assert len(v.failures) == 1 and "top-1 mismatch rate" in v.failures[0]
    assert "top-1 mismatch at prompt 3 position 7" in v.notes


def test_seed_rule_mean_threshold_is_strict():
    assert seed_rule([], 0.0099, Thresholds())["passed"]
    assert not seed_rule([], 0.01, Thresholds())["passed"]
    assert seed_rule([], 0.015, Thresholds(top1_prob_rel_err_mean=0.02))["passed"]
    assert not seed_rule([Check("p", False, False)], 0.0, Thresholds())["passed"]
    assert seed_rule([Check("p", False, True)], 0.0, Thresholds())["passed"]  # a near-tie


def test_op_failures_fail_only_when_required():
    assert verdict(GOOD, FLOOR, Thresholds(), failed_ops=["rms_norm"]).passed
    strict = verdict(GOOD, FLOOR, Thresholds(ops_must_conform=1), failed_ops=["rms_norm"])
    assert not strict.passed and "rms_norm" in strict.failures[0]


def test_parse_overrides():
    t = parse_overrides(["near_tie_margin=0.05", "top1_prob_rel_err_mean=0.02,drift_rel_l2=0.1"])
    assert (t.near_tie_margin, t.top1_prob_rel_err_mean, t.drift_rel_l2) == (0.05, 0.02, 0.1)
    for bad in (["nope=1"], ["near_tie_margin"], ["near_tie_margin=abc"], ["near_tie_margin=-1"]):
        with pytest.raises(InputError):
            parse_overrides(bad)


def test_drift_default_depends_on_dtype():
    assert Thresholds().for_dtype("float32").drift_rel_l2 < Thresholds().for_dtype("bfloat16").drift_rel_l2
    assert Thresholds(drift_rel_l2=0.3).for_dtype("float32").drift_rel_l2 == 0.3


def test_relative_l2_known_answer():
    assert relative_l2(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5])) == pytest.approx(0.1)
    assert relative_l2(torch.zeros(3), torch.zeros(3)) == 0.0
    assert math.isinf(relative_l2(torch.zeros(2), torch.ones(2)))
    with pytest.raises(ValueError):
        relative_l2(torch.zeros(2), torch.zeros(3))


def test_first_layer_over_threshold_is_named():
    ref = [torch.ones(1, 2, 4) * (i + 1) for i in range(4)]
    dev = [ref[0], ref[1] * 1.001, ref[2] * 1.2, ref[3] * 1.3]
    drift = layer_drift(ref, dev)
    assert drift == pytest.approx([0.0, 0.001, 0.2, 0.3], rel=1e-4)
    summary = summarize_drift([drift, [0.0, 0.002, 0.05, 0.1]], threshold=0.1)
    assert summary.first_over == "layer 1"  # hidden state 2 = after layer 1
    assert summary.max[2] == pytest.approx(0.2) and summary.mean[2] == pytest.approx(0.125)
    assert first_over([float("nan"), 0.5], 0.1) == 1
    assert summarize_drift([[0.0, 0.01]], threshold=0.1).first_over is None
