"""Fixtures for the validation tests: the runs several tests read."""
from __future__ import annotations

import pytest
from compare_runner import CliRun, run_cli


@pytest.fixture(scope="session")
def fp32_run(tiny_checkpoint, tmp_path_factory) -> CliRun:
    """The default protocol (seed prompts, 4 teacher-forced positions) on cpu float32."""
    folder = tmp_path_factory.mktemp("reports") / "cpu-fp32"
    return run_cli(["--device", "cpu", "--dtype", "float32", "--model", str(tiny_checkpoint)], folder)
