"""The GitHub workflows: valid against the GitHub workflow JSON schema that check-jsonschema vendors
(SchemaStore's, shipped inside the package: no network), with the device matrix, the steps that
make a run fail on an accuracy failure or a regression, the artifacts, and command lines that
the CLIs they call accept."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def load(name: str) -> dict:
    doc = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())
    if True in doc:  # YAML 1.1 reads the key `on` as a boolean
        doc["on"] = doc.pop(True)
    return doc


def validate(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           *map(str, files)], capture_output=True, text=True)


def test_workflows_match_the_github_workflow_schema():
    assert [p.name for p in WORKFLOWS] == ["benchmarks.yml", "ci.yml"]
    result = validate(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_a_broken_workflow(tmp_path):
    broken = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    del broken["jobs"]["cpu"]["runs-on"]
    broken["jobs"]["cpu"]["timeout-minutes"] = "soon"
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(broken))
    result = validate(path)
    assert result.returncode == 1 and "runs-on" in result.stdout + result.stderr


def _steps(job: dict) -> str:
    return "\n".join(step.get("run", "") + str(step.get("uses", "")) for step in job["steps"])


def test_ci_runs_tests_accuracy_quick_benchmarks_and_the_gate_on_cpu():
    ci = load("ci.yml")
    assert set(ci["on"]) == {"push", "pull_request"}
    job = ci["jobs"]["cpu"]
    assert job["runs-on"] == "ubuntu-latest" and job["strategy"]["matrix"]["device"] == ["cpu"]
    text = _steps(job)
    order = [".ci/run", "python -m validation.compare", "python -m benchmarks.run", "python -m benchmarks.compare"]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions)
    assert "--quick" in text
    upload = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"  # the report and JSON come back from a failing run too


def test_benchmarks_matrix_selects_devices_by_runner_labels():
    bench = load("benchmarks.yml")
    job = bench["jobs"]["bench"]
    runners = {e["device"]: e["runner"] for e in job["strategy"]["matrix"]["include"]}
    assert runners == {"cpu": "ubuntu-latest", "cuda": ["self-hosted", "gpu"], "npu": ["self-hosted", "ascend"]}
    assert job["runs-on"] == "${{ matrix.runner }}"
    text = _steps(job)
    for command in ("python -m pytest -q", "python -m validation.compare", "python -m validation.conformance",
                    "python -m benchmarks.run", "--benchmark-only", "python -m benchmarks.compare",
                    "actions/upload-artifact"):
        assert command in text
    for test_file in re.findall(r"benchmarks/test_\w+\.py", text):
        assert (ROOT / test_file).is_file(), test_file


def _commands(module: str) -> list[list[str]]:
    """Every ``python -m MODULE ...`` of every workflow, continuation lines joined, ``${{ }}`` and
    shell variables replaced by plausible values."""
    found = []
    for path in WORKFLOWS:
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            at = line.find(f"python -m {module} ")
            if at < 0:
                continue
            command = re.sub(r"\$\{\{[^}]*\}\}", "cpu", line[at:])
            command = command.replace('"$DEVICE"', "cpu").replace('"$OUT', '"out')
            words = shlex.split(command)[3:]
            ends = [i for i, w in enumerate(words) if w in (">", "|", ";", "&&", "||")]  # shell, not arguments
            found.append(words[:ends[0]] if ends else words)
    return found


@pytest.mark.parametrize("module", ["benchmarks.run", "benchmarks.compare", "validation.compare",
                                    "validation.conformance"])
def test_workflow_command_lines_parse(module):
    from benchmarks.compare import build_parser as compare_parser
    from benchmarks.run import parse_args
    from validation.compare import build_parser as accuracy_parser
    from validation.conformance import build_parser as conformance_parser

    parse = {"benchmarks.run": parse_args, "benchmarks.compare": compare_parser().parse_args,
             "validation.compare": accuracy_parser().parse_args,
             "validation.conformance": conformance_parser().parse_args}[module]
    commands = _commands(module)
    assert commands
    for args in commands:
        parse(args)  # argparse exits (SystemExit) on an unknown option
