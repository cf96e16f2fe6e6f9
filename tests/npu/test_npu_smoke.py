"""The hardware runbook runs end to end on the emulator (labelled EMULATED) and refuses, in one
line with exit 2, when there is no NPU."""
from __future__ import annotations

import json

from validation import npu_smoke


def test_runbook_without_npu_exits_2_with_the_reason(no_npu_env, capsys):
    assert npu_smoke.main(["--skip", "conformance", "compare", "speed"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: device 'npu' is not available: torch_npu not installed "
                   "(pip install 'minicpm-hal[npu]' on an Ascend host)")


def test_runbook_on_the_emulator(emulated, tmp_path, capsys):
    code = npu_smoke.main(["--emulate", "--presets", "tiny", "--skip", "conformance", "--new-tokens", "3",
                           "--out", str(tmp_path)])
    summary = (tmp_path / "summary.md").read_text()
    assert code == 0, summary
    assert summary.startswith("# NPU smoke report (EMULATED")
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["emulated"] and [s["step"] for s in data["steps"]][0] == "compare-synthetic-tiny"
    report = (tmp_path / "compare-synthetic-tiny" / "report.md").read_text()
    assert "EMULATED" in report.splitlines()[0]
    speed = data["steps"][-1]
    assert speed["step"].startswith("speed") and speed["exit"] == 0, speed
    assert "graph_decode_tokens_per_s=" in speed["result"] and "graph_tokens_equal_to_eager=3/3" in speed["result"]
