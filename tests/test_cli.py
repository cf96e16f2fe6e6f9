"""Command-line tools: output on success, one-line errors and exit codes on bad input."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


def test_synthetic_cli_writes_a_loadable_checkpoint(tmp_path):
    proc = run("model.synthetic", str(tmp_path / "c"), "--preset", "tiny", "--seed", "3", "--shards", "2")
    assert proc.returncode == 0, proc.stderr
    assert "wrote synthetic tiny checkpoint" in proc.stdout
    assert len(list((tmp_path / "c").glob("model-0000?-of-00002.safetensors"))) == 2


def test_generate_cli_streams_and_reports(tiny_checkpoint):
    proc = run("model.generate", "--model", str(tiny_checkpoint), "--device", "cpu", "--greedy",
               "--max-new-tokens", "5", "The capital of France is")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "tok/s" in proc.stderr


def test_generate_cli_bad_inputs(tmp_path, tiny_checkpoint):
    assert_one_line_error(run("model.generate", "--model", str(tmp_path / "missing"), "hi"),
                          "checkpoint folder not found")
    assert_one_line_error(run("model.generate", "--model", str(tiny_checkpoint), "--device", "npu", "hi"),
                          "device 'npu' is not available")
    assert_one_line_error(run("model.generate", "--model", str(tiny_checkpoint), "--device", "tpu", "hi"),
                          "unknown device 'tpu'")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{ nope")
    assert_one_line_error(run("model.generate", "--model", str(bad), "hi"), "malformed JSON")


def test_generate_cli_decode_graph(tiny_checkpoint):
    assert_one_line_error(run("model.generate", "--model", str(tiny_checkpoint), "--device", "cpu",
                              "--decode-graph", "hi"), "decode graphs need a cuda or npu device")
    proc = run("model.generate", "--model", str(tiny_checkpoint), "--device", "npu", "--greedy",
               "--decode-graph", "--max-new-tokens", "4", "hi", env={"HAL_NPU_EMULATE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "(decode graph)" in proc.stderr
