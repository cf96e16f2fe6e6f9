"""python -m validation.compare end to end on the tiny synthetic checkpoint."""
from __future__ import annotations

from backends.cpu import QUANTIZED_LINEARS

import json

import pytest
import torch
from compare_runner import run_cli

import hal
from hal.ops import CATALOGUE
from validation.prompts import DEFAULT_PROMPTS
from expected_bindings import float32_cpu_linear

METRIC_KEYS = ("top1_match_rate", "top5_inclusion_rate", "top10_overlap_mean", "top1_prob_rel_err_mean",
               "top1_prob_rel_err_max", "top1_prob_rel_err_max_prompt", "top10_prob_mae",
               "top10_prob_max_abs_err", "top10_prob_rmse", "kl_mean", "kl_max")


def test_fp32_passes_and_writes_every_file(fp32_run):
    assert fp32_run.code == 0, fp32_run.stderr
    names = sorted(p.name for p in fp32_run.report_dir.iterdir())
    assert names == ["drift.png", "report.json", "report.md", "top10.png"]
    for png in ("drift.png", "top10.png"):
        assert (fp32_run.report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    leftovers = [p.name for p in fp32_run.report_dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_stdout_is_the_seed_style_report_and_stderr_has_progress(fp32_run):
    md = (fp32_run.report_dir / "report.md").read_text(encoding="utf-8")
    assert md in fp32_run.stdout
    for section in ("## Environment", "## Model configuration", "## Accuracy per prompt", "## Summary",
                    "## Top-10 distribution per prompt", "## Verdict", "**PASS**"):
        assert section in md
    assert "EMULATED" not in md
    progress = [line for line in fp32_run.stderr.splitlines() if line.startswith("[compare] prompt")]
    assert len(progress) == len(DEFAULT_PROMPTS)


def test_report_json_schema(fp32_run):
    r = fp32_run.report
    assert r["schema_version"] == 2 and r["passed"] is True
    assert (r["device"], r["dtype"], r["reference"], r["emulated"]) == ("cpu", "float32", "cpu-fp32", False)
    for key in METRIC_KEYS:
        assert key in r and key in r["prompt_end"]
    assert [p["prompt"] for p in r["prompts"]] == list(DEFAULT_PROMPTS)
    assert all(len(p["positions"]) == 5 for p in r["prompts"])  # prompt end + 4 teacher-forced
    assert set(r["bound_ops"]) == set(CATALOGUE)
    assert all(b["impl"] == "cpu.torch" for op, b in r["bound_ops"].items() if op not in QUANTIZED_LINEARS + ("linear", "logits"))
    assert r["bound_ops"]["linear"]["impl"] == float32_cpu_linear()
    assert r["bound_ops"]["logits"]["impl"] == "cpu.onednn"  # float32 lm_head: oneDNN on the [V, E] table
    assert r["environment"]["torch"] == torch.__version__
    assert r["model"]["config"]["num_hidden_layers"] == len(r["drift"]["layers"]) - 1
    assert r["conformance"]["failed_ops"] == [] and r["conformance"]["total"] > 0
    json.dumps(r, allow_nan=False)


def test_fp32_device_agrees_with_the_reference(fp32_run):
    r = fp32_run.report
    assert r["top1_match_rate"] == 1.0 and r["top10_overlap_mean"] == 10.0
    assert r["top1_prob_rel_err_max"] < 1e-4  # two float32 implementations: rounding-level only
    assert r["drift"]["first_layer_over"] is None


def test_numbers_match_an_independent_reference_run(fp32_run, tiny_checkpoint):
    """Recompute prompt 1 with the reference model directly: its top-1 and the teacher forcing."""
    r = fp32_run.report["prompts"][0]
    model = hal.load_model(tiny_checkpoint, "cpu", "float32", reference=True)
    ids = model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    for pos in r["positions"]:
        probs = torch.softmax(model.logits(ids)[0, -1].double(), -1)
        assert pos["position"] == ids.shape[1] - 1
        assert pos["ref_top1"]["id"] == int(probs.argmax())
        assert pos["ref_top1"]["prob"] == pytest.approx(float(probs.max()), rel=1e-5)
        ids = torch.cat([ids, probs.argmax().view(1, 1)], dim=1)  # the reference's greedy token


def test_cpu_bfloat16_passes(tiny_checkpoint, tmp_path):
    run = run_cli(["--device", "cpu", "--dtype", "bfloat16", "--model", str(tiny_checkpoint)], tmp_path / "r")
    assert run.code == 0, run.report["verdict"]
    # every bound op also conforms on this model's shapes, outside the model's inference_mode
    conformance = run.report["conformance"]
    assert conformance["failed_ops"] == [], conformance["failed_ops"]
    assert conformance["passed"] == conformance["total"]


def test_npu_emulated_report_says_emulated(tiny_checkpoint, tmp_path, monkeypatch):
    """float32 on the emulated NPU must pass (exit 0), and the report's numbers are the ones an
    independent float32 reference run gives (the device's too, up to float32 rounding)."""
    from hal import probing as devices
    monkeypatch.delenv("HAL_NPU_EMULATE", raising=False)  # main() sets it; undone at teardown
    devices.reset()
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\n")
    try:
        run = run_cli(["--device", "npu", "--emulate", "--dtype", "float32", "--model", str(tiny_checkpoint),
                       "--prompts", str(prompts), "--positions", "1"], tmp_path / "r")
    finally:
        devices.reset()
    assert run.code == 0, run.stderr
    r = run.report
    assert r["emulated"] is True and "EMULATED" in r["title"] and "EMULATED" in r["device_description"]
    md = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert md.startswith("# ") and "EMULATED" in md.splitlines()[0]
    model = hal.load_model(tiny_checkpoint, "cpu", "float32", reference=True)
    ids = model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    positions = r["prompts"][0]["positions"]
    ids = torch.cat([ids, torch.tensor([[positions[0]["ref_top1"]["id"]]])], dim=1)
    probs = torch.softmax(model.logits(ids)[0].double(), -1)
    for pos in positions:
        p = probs[pos["position"]]
        assert pos["ref_top1"]["id"] == pos["dev_top1"]["id"] == int(p.argmax())
        # the report's reference decodes teacher-forced positions through its KV cache (the
        # deployment protocol); this recomputes them in one prefill: two float32 paths, measured
        # 1.3e-6 apart (relative) at position 1, so 1e-6 was below float32 path noise
        assert pos["ref_top1"]["prob"] == pytest.approx(float(p.max()), rel=1e-5)
        assert pos["dev_prob_of_ref_top1"] == pytest.approx(float(p.max()), rel=1e-4)
        assert pos["top1_match"] is True and pos["top10_overlap"] == 10
    assert r["top1_match_rate"] == 1.0 and r["top1_prob_rel_err_max"] < 1e-4


def test_decode_graph_protocol_on_the_emulated_npu(tiny_checkpoint, tmp_path, monkeypatch):
    """--decode-graph: the report names the graph that served the decode steps; the cpu (no
    graphs) is refused in one line with exit 2 before any model loads."""
    from hal import probing as devices
    monkeypatch.delenv("HAL_NPU_EMULATE", raising=False)
    devices.reset()
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\n")
    try:
        run = run_cli(["--device", "npu", "--emulate", "--decode-graph", "--model", str(tiny_checkpoint),
                       "--prompts", str(prompts), "--positions", "2"], tmp_path / "r")
    finally:
        devices.reset()
    assert run.code == 0, run.stderr
    assert "NPUGraph" in run.report["settings"]["decode_graph"]
    assert "Decode steps replayed from a device graph" in (tmp_path / "r" / "report.md").read_text()
    cpu = run_cli(["--device", "cpu", "--decode-graph", "--model", str(tiny_checkpoint),
                   "--prompts", str(prompts)], tmp_path / "c")
    assert cpu.code == 2 and "--decode-graph needs --device cuda or npu" in cpu.stderr
    assert not cpu.report_dir.exists()
