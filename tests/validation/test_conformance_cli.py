"""python -m validation.conformance: test mode, captured mode (capturable implementations inside
the emulated graph) and usage errors, run in-process."""
from __future__ import annotations

from validation import conformance


def test_test_mode_prints_one_line_per_case_and_passes(capsys):
    assert conformance.main(["--device", "cpu", "--op", "rms_norm", "-p", "T=63"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rms_norm(")]
    assert lines and all("T=63" in line and ": OK (NMSE" in line for line in lines)


def test_captured_mode_runs_only_capturable_implementations(capsys):
    assert conformance.main(["--device", "cpu", "--mode", "captured", "--op", "attention_decode",
                             "--op", "sample", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    cases = [line for line in out.splitlines() if line.startswith("attention_decode(")]
    assert cases and all("[cpu.torch_full (captured, emulated graph)]: OK" in line for line in cases)
    assert "sample: no capturable cpu implementation registered" in out


def test_usage_errors_exit_2(capsys):
    assert conformance.main(["--op", "softmax"]) == 2
    assert "unknown op(s) softmax" in capsys.readouterr().err
