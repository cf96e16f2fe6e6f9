"""In-process runner of ``python -m validation.compare`` for the validation tests (a module
of its own: importing from conftest breaks when several test folders have a conftest)."""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
