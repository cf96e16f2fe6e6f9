"""User errors exit 2 with one line and leave no report behind; devices that are not here say why."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from compare_runner import run_cli

from hal.errors import DeviceUnavailable
from validation import compare

ROOT = Path(__file__).resolve().parents[2]
from hal import probing as devices


@pytest.fixture(autouse=True)
def _real_devices(monkeypatch):
    """No emulator, fresh probes (another test may have probed an emulated NPU)."""
    monkeypatch.delenv("HAL_NPU_EMULATE", raising=False)
    devices.reset()
    yield
    devices.reset()


def assert_usage_error(run, *needles: str) -> None:
    assert run.code == 2, run.stdout + run.stderr
    lines = [line for line in run.stderr.strip().splitlines() if not line.startswith("[compare] ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr  # progress lines aside
    assert run.stderr.strip().splitlines()[-1] == lines[0]
    for needle in needles:
        assert needle in lines[0]
    assert not run.report_dir.exists()
    assert [p.name for p in run.report_dir.parent.iterdir() if p.name.startswith(".")] == []


def test_npu_without_torch_npu_exits_2_with_the_reason(tmp_path):
    """In a fresh process (this one may hold the emulator's stand-in torch_npu module)."""
    env = {k: v for k, v in os.environ.items() if k != "HAL_NPU_EMULATE"}
    probe = subprocess.run([sys.executable, "-c", "import hal; print(hal.devices()[2].reason)"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=120)
    reason = probe.stdout.strip()
    if probe.returncode != 0 or not reason:
        pytest.skip("an NPU is available here")
    proc = subprocess.run([sys.executable, "-m", "validation.compare", "--device", "npu",
                           "--report-dir", str(tmp_path / "r")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: device 'npu' is not available") and reason in proc.stderr
    assert "torch_npu" in proc.stderr  # which library is missing
    assert not (tmp_path / "r").exists()


def test_cuda_unavailable_exits_2(tmp_path):
    if devices.probe("cuda").available:
        pytest.skip("a CUDA GPU is available here")
    assert_usage_error(run_cli(["--device", "cuda"], tmp_path / "r"), "cuda", devices.probe("cuda").reason)


def test_missing_model(tmp_path):
    run = run_cli(["--device", "cpu", "--model", str(tmp_path / "nope")], tmp_path / "r")
    assert_usage_error(run, "nope")


def test_broken_model_config(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert_usage_error(run_cli(["--device", "cpu", "--model", str(bad)], tmp_path / "r"), "config.json")


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("missing.txt", None, "not found"),
    ("empty.txt", "\n# only a comment\n\n", "no prompt"),
    ("bad.json", "[\"a\", ", "malformed JSON"),
    ("wrong.json", "{\"prompt\": \"a\"}", "list of strings"),
    ("latin1.txt", b"caf\xe9\n", "UTF-8"),
])
def test_bad_prompts_file(tmp_path, tiny_checkpoint, name, content, needle):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    run = run_cli(["--device", "cpu", "--model", str(tiny_checkpoint), "--prompts", str(path)],
                  tmp_path / "r")
    assert_usage_error(run, name, needle)


def test_unwritable_report_dir(tmp_path, tiny_checkpoint):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run = run_cli(["--device", "cpu", "--model", str(tiny_checkpoint)], blocker / "report")
    assert run.code == 2 and "cannot write the report" in run.stderr and "Traceback" not in run.stderr
    assert blocker.read_text() == "not a folder"


def test_existing_report_dir_is_not_overwritten(tmp_path, tiny_checkpoint):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    run = run_cli(["--device", "cpu", "--model", str(tiny_checkpoint)], folder)
    assert run.code == 2 and "already exists" in run.stderr
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


def test_failure_while_writing_leaves_no_half_written_report(tmp_path, tiny_checkpoint, monkeypatch):
    def write_then_fail(report, folder):
        (folder / "report.md").write_text("partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compare, "write_report", write_then_fail)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Einstein is known for\n")
    run = run_cli(["--device", "cpu", "--model", str(tiny_checkpoint), "--prompts", str(prompts),
                   "--positions", "0"], tmp_path / "out" / "r")
    assert_usage_error(run, "No space left")
    assert list((tmp_path / "out").iterdir()) == []


def test_hf_reference_needs_trust_remote_code(tmp_path, tiny_checkpoint):
    run = run_cli(["--device", "cpu", "--model", str(tiny_checkpoint), "--reference", "hf"], tmp_path / "r")
    assert_usage_error(run, "--trust-remote-code")


def test_hf_reference_on_a_checkpoint_without_remote_code(tmp_path, tiny_checkpoint):
    run = run_cli(["--device", "cpu", "--model", str(tiny_checkpoint), "--reference", "hf",
                   "--trust-remote-code"], tmp_path / "r")
    assert_usage_error(run, "no remote code files", "modeling_minicpm.py")


@pytest.mark.parametrize("args", [["--thresholds", "nope=1"], ["--dtype", "int8"], ["--top-k", "3"],
                                  ["--positions", "-1"], ["--trust-remote-code"]])
def test_bad_options(tmp_path, tiny_checkpoint, args):
    run = run_cli(["--device", "cpu", "--model", str(tiny_checkpoint), *args], tmp_path / "r")
    assert_usage_error(run)


def test_emulate_is_set_before_the_device_is_probed(tmp_path, monkeypatch):
    seen = {}

    def fake_resolve(name):
        seen["env"] = os.environ.get("HAL_NPU_EMULATE")
        raise DeviceUnavailable("stop here")

    monkeypatch.setattr(devices, "resolve", fake_resolve)
    run = run_cli(["--device", "npu", "--emulate"], tmp_path / "r")
    assert run.code == 2 and seen["env"] == "1"
