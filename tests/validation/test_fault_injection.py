"""Fault injection: a device with one deliberately wrong op must fail compare, and the report
must name that op (conformance) and the layer where the drift starts."""
from __future__ import annotations

import torch

from backends.cpu.ops import rms_norm_cpu, rotary_cpu
from validation import compare, harness
from validation.passrule import Thresholds


def perturbed_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """A plausible bug: the gain applied in reversed channel order."""
    return rms_norm_cpu(x, weight.flip(0), eps)


def off_by_one_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """A plausible bug: keys rotated with the previous position's angles."""
    prev_cos = torch.cat([cos[:, :1], cos[:, :-1]], dim=1)
    prev_sin = torch.cat([sin[:, :1], sin[:, :-1]], dim=1)
    q_out, _ = rotary_cpu(q, k, cos, sin)
    _, k_out = rotary_cpu(q, k, prev_cos, prev_sin)
    return q_out, k_out


def run_with(op: str, fn, checkpoint, tmp_path):
    settings = harness.Settings(model=checkpoint, device="cpu", dtype="float32",
                                prompts=["The capital of France is", "Machine learning is a"], positions=2,
                                thresholds=Thresholds(), op_overrides={op: fn})
    report = harness.run(settings)
    compare.write_report(report, tmp_path)
    return report, (tmp_path / "report.md").read_text(encoding="utf-8")


def test_perturbed_rms_norm_fails_and_is_named(tiny_checkpoint, tmp_path):
    report, md = run_with("rms_norm", perturbed_rms_norm, tiny_checkpoint, tmp_path)
    assert report["passed"] is False and report["verdict"]["failures"]
    assert report["conformance"]["failed_ops"] == ["rms_norm"]
    assert report["bound_ops"]["rms_norm"]["impl"] == "override"
    # rms_norm only normalises the first layer's input: the embedding is exact, layer 0 drifts
    assert report["drift"]["first_layer_over"] == "layer 0"
    assert report["drift"]["layers"][0]["rel_l2_max"] == 0.0
    assert "op conformance failed for: rms_norm" in md and "First layer past" in md and "**layer 0**" in md


def test_off_by_one_rotary_fails_and_is_named(tiny_checkpoint, tmp_path):
    report, md = run_with("rotary", off_by_one_rotary, tiny_checkpoint, tmp_path)
    assert report["passed"] is False
    assert report["conformance"]["failed_ops"] == ["rotary"]
    assert report["drift"]["first_layer_over"] == "layer 0"
    assert any(c["op"] == "rotary" and c["status"] == "FAIL" for c in report["conformance"]["cases"])
    assert "rotary" in md and "FAIL" in md
