"""``python -m benchmarks.compare``: the ratio regression gate, on hand-made result documents."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.compare import SCHEMA, main

ROOT = Path(__file__).resolve().parent.parent


def doc(**ratios) -> dict:
    """A result document holding only the gate's fields: name -> value, or (value, tracked)."""
    out = {}
    for key, value in ratios.items():
        value, tracked = value if isinstance(value, tuple) else (value, True)
        out[key.replace("__", "/")] = {"value": value, "tracked": tracked}
    return {"schema": SCHEMA, "ratios": out}


def write(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def gate(tmp_path, base, new, *extra) -> tuple[int, str]:
    code = main([str(write(tmp_path, "base.json", base)), str(write(tmp_path, "new.json", new)), *extra])
    return code


def test_within_margin_passes_and_beyond_fails(tmp_path, capsys):
    base = doc(throughput__32__output_tok_s__hf=2.0, long__252__decode__hf=1.0)
    # 2.0 -> 1.5 is exactly a 25 % drop: allowed at margin 0.25; 1.49 is not
    assert gate(tmp_path, base, doc(throughput__32__output_tok_s__hf=1.5, long__252__decode__hf=1.0),
                "--margin", "0.25") == 0
    assert gate(tmp_path, base, doc(throughput__32__output_tok_s__hf=1.49, long__252__decode__hf=1.0),
                "--margin", "0.25") == 1
    out = capsys.readouterr().out
    assert "| throughput/32/output_tok_s/hf | 2.000x | 1.490x | -25.5% | REGRESSION" in out
    assert "1 ratios ok, 1 failing" in out


def test_default_margin_is_twenty_percent(tmp_path):
    base = doc(a=1.0)
    assert gate(tmp_path, base, doc(a=0.81)) == 0
    assert gate(tmp_path, base, doc(a=0.79)) == 1
    assert gate(tmp_path, base, doc(a=5.0)) == 0  # an improvement never fails


def test_missing_metric_fails_unless_allowed(tmp_path, capsys):
    base, new = doc(a=1.0, b=1.0), doc(a=1.0)
    assert gate(tmp_path, base, new) == 1
    assert "| b | 1.000x | — |  | missing in NEW |" in capsys.readouterr().out
    assert gate(tmp_path, base, new, "--allow-missing") == 0


def test_new_metric_is_listed_and_passes(tmp_path, capsys):
    assert gate(tmp_path, doc(a=1.0), doc(a=1.0, c=0.1)) == 0
    assert "| c | — | 0.100x |  | new metric |" in capsys.readouterr().out


def test_zero_baseline_is_not_compared(tmp_path, capsys):
    assert gate(tmp_path, doc(a=0.0, b=None), doc(a=0.0, b=0.5)) == 0
    out = capsys.readouterr().out
    assert out.count("zero baseline: not compared") == 2


def test_zero_measurement_in_new_fails(tmp_path, capsys):
    assert gate(tmp_path, doc(a=1.0), doc(a=None)) == 1
    assert "INCOMPARABLE" in capsys.readouterr().out


def test_untracked_ratios_are_ignored(tmp_path):
    assert gate(tmp_path, doc(a=(1.0, False), b=1.0), doc(a=(0.01, False), b=1.0)) == 0
    assert gate(tmp_path, doc(a=(1.0, False)), doc()) == 0


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"),
    ({"schema": "other/1", "ratios": {}}, "field 'schema' must be 'minicpm-hal-bench/1', got 'other/1'"),
    ({"schema": SCHEMA}, "field 'ratios' must be an object"),
    ({"schema": SCHEMA, "ratios": {"a": 1.0}}, "ratios['a'] must be an object with a 'value'"),
    ('{"schema": "minicpm-hal-bench/1", "ratios": {"a": {"value": NaN}}}', "not JSON (NaN is not a number"),
    ({"schema": SCHEMA, "ratios": {"a": {"value": -1}}}, "ratios['a'].value must be a finite number >= 0"),
    ({"schema": SCHEMA, "ratios": {"a": {"value": "1"}}}, "ratios['a'].value must be a finite number >= 0"),
])
def test_malformed_input_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    good = write(tmp_path, "good.json", doc(a=1.0))
    bad = write(tmp_path, "bad.json", content)
    assert main([str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_missing_file_and_bad_margin_via_the_cli(tmp_path):
    good = write(tmp_path, "good.json", doc(a=1.0))
    for args, message in (([str(tmp_path / "absent.json"), str(good)], "absent.json: cannot read"),
                          ([str(good), str(good), "--margin", "1.5"], "--margin must be in [0, 1)")):
        result = subprocess.run([sys.executable, "-m", "benchmarks.compare", *args], capture_output=True,
                                text=True, cwd=ROOT)
        assert result.returncode == 2
        assert message in result.stderr and "Traceback" not in result.stderr
