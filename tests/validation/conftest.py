"""Fixtures for the validation tests: one in-process CLI runner and the runs several tests read."""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from validation import compare


@dataclass
class CliRun:
    code: int
    stdout: str
    stderr: str
    report_dir: Path

    @property
    def report(self) -> dict[str, Any]:
        return json.loads((self.report_dir / "report.json").read_text(encoding="utf-8"))


def run_cli(args: list[str], report_dir: Path) -> CliRun:
    """``python -m validation.compare ARGS --report-dir report_dir``, in process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = compare.main([*args, "--report-dir", str(report_dir)])
    return CliRun(code, out.getvalue(), err.getvalue(), report_dir)


@pytest.fixture(scope="session")
def fp32_run(tiny_checkpoint, tmp_path_factory) -> CliRun:
    """The default protocol (seed prompts, 4 teacher-forced positions) on cpu float32."""
    folder = tmp_path_factory.mktemp("reports") / "cpu-fp32"
    return run_cli(["--device", "cpu", "--dtype", "float32", "--model", str(tiny_checkpoint)], folder)
