"""The floor verdict end to end: correct implementations pass, injected faults fail (exit 1).

On ``tiny`` through the CLI (fast); on the trained model (SmolLM2-135M-Instruct) one correct run
and one fault through the harness, with fewer prompts and positions than the default protocol."""
from __future__ import annotations

import pytest
from compare_runner import run_cli

from validation import faults, harness


def test_tiny_cpu_bfloat16_passes_against_its_floor(tiny_checkpoint, tmp_path):
    run = run_cli(["--device", "cpu", "--dtype", "bfloat16", "--model", str(tiny_checkpoint)], tmp_path / "r")
    r = run.report
    assert run.code == 0, r["verdict"]
    assert r["schema_version"] == 2 and r["fault"] is None
    assert [f["name"] for f in r["floor"]] == ["weights", "rounded-ops"]  # no CPU floor for the CPU itself
    for m in r["verdict"]["metrics"]:
        assert m["passed"] and m["device"] <= m["limit"]
    kl = next(m for m in r["verdict"]["metrics"] if m["metric"] == "kl_mean")
    assert kl["floor_source"] == "rounded-ops" and kl["floor"] > 0  # bf16 weights: the weights floor is 0
    md = (run.report_dir / "report.md").read_text(encoding="utf-8")
    assert "Seed 004's rule (informational, not the verdict)" in md and "| Floor implementation |" in md


@pytest.mark.parametrize("fault", ["rotary-interleaved", "decode-prev-slot"])
def test_tiny_injected_faults_fail(fault, tiny_checkpoint, tmp_path):
    run = run_cli(["--device", "cpu", "--dtype", "bfloat16", "--model", str(tiny_checkpoint),
                   "--inject-fault", fault], tmp_path / "r")
    r = run.report
    assert run.code == 1, r["verdict"]
    assert r["fault"] == fault and "fault injected" in (run.report_dir / "report.md").read_text(encoding="utf-8")
    kl = next(m for m in r["verdict"]["metrics"] if m["metric"] == "kl_mean")
    assert not kl["passed"] and kl["ratio"] > 10


def test_unknown_fault_is_a_usage_error(tiny_checkpoint, tmp_path):
    run = run_cli(["--device", "cpu", "--model", str(tiny_checkpoint), "--inject-fault", "nope"], tmp_path / "r")
    assert run.code == 2 and "unknown fault 'nope'" in run.stderr and "Traceback" not in run.stderr


def test_trained_model_correct_passes_and_a_fault_fails(trained_gguf):
    reuse: dict = {}
    prompts = ["The capital of France is"]

    def judge(fault):
        settings = harness.Settings(model=trained_gguf, device="cpu", dtype="bfloat16", prompts=prompts,
                                    positions=2, fault=fault)
        return harness.run(settings, reuse=reuse)

    good = judge(None)
    assert good["passed"], good["verdict"]
    bad = judge("gqa-shift")
    assert not bad["passed"]
    assert faults.FAULTS["gqa-shift"].required
