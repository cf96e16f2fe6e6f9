"""validation.compare's exit codes (0 pass, 1 accuracy fail, 2 bad input, 3 internal error), one
line on stderr and nothing left on disk; corrupt or poisoned checkpoints never get a PASS."""
from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from compare_runner import run_cli

import hal
from hal import probing
from model.checkpoint import SINGLE
from model.safetensors_mmap import SafetensorsFile, write_safetensors
from hal.errors import InputError
from validation import compare, harness
from validation.passrule import Thresholds


@pytest.fixture(autouse=True)
def _real_devices(monkeypatch):
    monkeypatch.delenv("HAL_NPU_EMULATE", raising=False)
    probing.reset()
    yield
    probing.reset()


def _one_error_line(run) -> str:
    lines = [line for line in run.stderr.strip().splitlines() if not line.startswith("[compare] ")]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    return lines[0]


def _nothing_left(parent: Path) -> None:
    assert [p.name for p in parent.iterdir() if p.name.startswith(".")] == []


def _prompts(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _shift_offsets(ckpt: Path) -> None:
    """The issue's corruption: one tensor's data_offsets moved 2 bytes into its neighbour."""
    path = ckpt / SINGLE
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = "model.layers.1.self_attn.k_proj.weight"
    header[name]["data_offsets"] = [o + 2 for o in header[name]["data_offsets"]]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _nan_weight(ckpt: Path) -> None:
    f = SafetensorsFile(ckpt / SINGLE)
    tensors = {name: f.tensor(name).clone() for name in f.entries}
    f.close()
    tensors["model.layers.2.self_attn.o_proj.weight"][3, 4] = float("nan")
    write_safetensors(ckpt / SINGLE, tensors)


@pytest.mark.parametrize(("args", "needle"), [
    (["--thresholds", "top1_prob_rel_err_mean=nan"],
     "top1_prob_rel_err_mean must be a finite number >= 0, got 'nan'"),
    (["--thresholds", "near_tie_margin=inf"], "near_tie_margin must be a finite number >= 0, got 'inf'"),
    (["--thresholds", "ops_must_conform=7"], "ops_must_conform must be 0 or 1, got '7'"),
    (["--device", ""], "device '' is empty"),
])
def test_bad_values_exit_2(tmp_path, tiny_checkpoint, args, needle):
    run = run_cli(["--device", "cpu", "--model", str(tiny_checkpoint), *args], tmp_path / "r")
    assert run.code == 2 and needle in _one_error_line(run)
    assert not run.report_dir.exists()
    _nothing_left(tmp_path)


@pytest.mark.parametrize("thresholds", [Thresholds(near_tie_margin=math.inf),
                                        Thresholds(top1_prob_rel_err_mean=math.nan)])
def test_non_finite_thresholds_are_refused_through_the_api(tiny_checkpoint, thresholds):
    settings = harness.Settings(model=tiny_checkpoint, device="cpu", prompts=["Hi"], thresholds=thresholds)
    with pytest.raises(InputError, match="must be a finite number >= 0, got (inf|nan)"):
        harness.run(settings)


@pytest.mark.parametrize("corrupt", [_shift_offsets, _nan_weight], ids=["shifted-offsets", "nan-weight"])
def test_corrupt_checkpoint_never_passes(tmp_path, tiny_checkpoint, corrupt):
    ckpt = tmp_path / "c"
    shutil.copytree(tiny_checkpoint, ckpt)
    corrupt(ckpt)
    run = run_cli(["--device", "cpu", "--model", str(ckpt), "--prompts", _prompts(tmp_path, "Hello")],
                  tmp_path / "r")
    line = _one_error_line(run)
    assert run.code == 2 and str(ckpt / SINGLE) in line
    assert ("invalid offset" in line) if corrupt is _shift_offsets else \
        ("'model.layers.2.self_attn.o_proj.weight' holds 1 non-finite" in line)
    assert not run.report_dir.exists()


def test_report_dir_under_a_file_names_the_file(tmp_path, tiny_checkpoint):
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    run = run_cli(["--device", "cpu", "--model", str(tiny_checkpoint)], blocker / "sub")
    assert run.code == 2
    expected = f"error: cannot write the report to {blocker / 'sub'}: {blocker} is a file, not a folder"
    assert _one_error_line(run) == expected
    assert blocker.read_text() == "mine"


def test_disk_full_names_the_report_folder(tmp_path, tiny_checkpoint, monkeypatch):
    def full(report, folder):
        (folder / "report.md").write_text("half")
        raise OSError(28, "No space left on device")  # as write() raises it: no file name

    monkeypatch.setattr(compare, "write_report", full)
    run = run_cli(["--device", "cpu", "--model", str(tiny_checkpoint), "--positions", "0",
                   "--prompts", _prompts(tmp_path, "Hello")], tmp_path / "out" / "r")
    assert run.code == 2
    assert _one_error_line(run) == f"error: cannot write the report to {tmp_path / 'out' / 'r'}: " \
                                   "No space left on device"
    assert list((tmp_path / "out").iterdir()) == []


def test_too_long_prompt_is_named_before_any_model_loads(tmp_path, tiny_checkpoint, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the prompt lengths were checked")

    monkeypatch.setattr(hal, "load_model", must_not_load)
    long_prompt = " ".join(["word"] * 5000)
    run = run_cli(["--device", "cpu", "--model", str(tiny_checkpoint),
                   "--prompts", _prompts(tmp_path, "Hello", long_prompt)], tmp_path / "r")
    line = _one_error_line(run)
    assert run.code == 2
    assert re.fullmatch(r"error: prompt 2 \('word word .*\.\.\.'\) has \d+ tokens "
                        r"\+ 4 teacher-forced positions, "
                        r"more than max_position_embeddings=4096 of .*config\.json", line), line
    assert not run.report_dir.exists()


def test_accuracy_failure_exits_1_and_writes_the_report(tmp_path, tiny_checkpoint):
    """An attention scale of 1.0 is far outside the bf16 noise floor: exit 1, the report is kept."""
    run = run_cli(["--device", "cpu", "--model", str(tiny_checkpoint), "--positions", "1",
                   "--prompts", _prompts(tmp_path, "Hello"), "--inject-fault", "attn-scale-1"],
                  tmp_path / "r")
    assert run.code == 1, run.stderr
    assert run.report["passed"] is False and (run.report_dir / "report.md").is_file()
    _nothing_left(tmp_path)


def test_internal_error_exits_3_with_the_traceback_file(tmp_path, tiny_checkpoint, monkeypatch):
    def crash(settings, progress):
        return max(x for x in [] if x)

    monkeypatch.setattr(harness, "run", crash)
    run = run_cli(["--device", "cpu", "--model", str(tiny_checkpoint), "--prompts", _prompts(tmp_path, "Hi")],
                  tmp_path / "r")
    assert run.code == 3
    line = _one_error_line(run)
    match = re.fullmatch(r"internal error: ValueError: max\(\) .*empty.* \(full traceback: (.+)\)", line)
    assert match, line
    trace = Path(match.group(1))
    try:
        assert "Traceback" in trace.read_text() and "crash" in trace.read_text()
    finally:
        trace.unlink()
    assert not run.report_dir.exists()
    _nothing_left(tmp_path)


def test_nan_device_fails_and_names_the_first_non_finite_layer(tmp_path, tiny_checkpoint):
    """Device-side NaN from layer 0's MLP on: the run FAILs (it used to crash in the progress
    line, or PASS with the NaN entries dropped) and the drift table names layer 0."""
    from backends.cpu.ops import swiglu_cpu

    def nan_swiglu(gate, up):
        return torch.full_like(swiglu_cpu(gate, up), float("nan"))

    settings = harness.Settings(model=tiny_checkpoint, device="cpu", dtype="float32", prompts=["Hello there"],
                                positions=1, op_overrides={"swiglu": nan_swiglu})
    report = harness.run(settings)
    assert report["passed"] is False
    assert report["top1_match_rate"] == 0.0 and report["kl_mean"] == math.inf
    assert report["drift"]["first_layer_non_finite"] == "layer 0"
    names = compare.write_report(report, tmp_path)  # inf renders and serialises (JSON null)
    assert "First hidden state holding NaN/Inf: **layer 0**" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["kl_mean"] is None and len(names) == 4
