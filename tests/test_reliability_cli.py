"""Issue 10 on the command line: every failure gets its exit code and one stderr line (no
traceback), and nothing is left on disk, also after SIGINT, SIGTERM (also as ``timeout`` sends
it) or a closed pipe.

Value and message cases run ``main()`` in process (run_main is inside it, so the exit code and
the stderr line are the CLI's); signals and pipes need real processes, started once per case
and signalled only after a progress line shows the work is under way.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from model import generate, synthetic
from model.checkpoint import SINGLE
from model.safetensors_mmap import SafetensorsFile, write_safetensors

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = ("[minicpm-hal] ", "[compare] ")


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if not line.startswith(PROGRESS)]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _run_in_process(capsys, tool, argv: list[str]) -> tuple[int, str]:
    code = tool.main(argv)
    return code, capsys.readouterr().err


def _scaled(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    """Finite weights whose layer-1 MLP output overflows float16 (bfloat16 runs it)."""
    ckpt = tmp_path / "fp16-overflow"
    shutil.copytree(tiny_checkpoint, ckpt)
    f = SafetensorsFile(ckpt / SINGLE)
    tensors = {name: f.tensor(name).clone() for name in f.entries}
    f.close()
    tensors["model.layers.1.mlp.down_proj.weight"] *= 3000
    tensors["model.layers.1.mlp.up_proj.weight"] *= 30
    write_safetensors(ckpt / SINGLE, tensors)
    return ckpt


def _poisoned(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    ckpt = tmp_path / "nan"
    shutil.copytree(tiny_checkpoint, ckpt)
    f = SafetensorsFile(ckpt / SINGLE)
    tensors = {name: f.tensor(name).clone() for name in f.entries}
    f.close()
    tensors["model.embed_tokens.weight"][17, 3] = float("nan")
    write_safetensors(ckpt / SINGLE, tensors)
    return ckpt


def _bad_generation_config(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    ckpt = tmp_path / "genconf"
    shutil.copytree(tiny_checkpoint, ckpt)
    data = json.loads((ckpt / "generation_config.json").read_text())
    data["temperature"] = -1
    (ckpt / "generation_config.json").write_text(json.dumps(data))
    return ckpt


# (id, argv builder(tmp, tiny) -> argv, env changes(tmp) -> dict, expected stderr line)
CPU = ["--device", "cpu"]
GENERATE_CASES = [
    ("temperature-nan", lambda t, c: ["--model", str(c), *CPU, "--temperature", "nan", "hi"], None,
     "error: temperature must be a finite number, got nan"),
    ("seed-beyond-64-bits", lambda t, c: ["--model", str(c), *CPU, "--seed", str(2**70), "hi"], None,
     "error: seed must be in [0, 18446744073709551615], got 1180591620717411303424"),
    ("empty-device", lambda t, c: ["--model", str(c), "--device", "", "hi"], None,
     "error: device '' is empty; choose one of: auto, cpu, cuda, npu"),
    ("HAL_DEVICE-gpu", lambda t, c: ["--model", str(c), "hi"], lambda t: {"HAL_DEVICE": "gpu"},
     "error: HAL_DEVICE='gpu': unknown device 'gpu'; choose one of: auto, cpu, cuda, npu"),
    ("HAL_CACHE_DIR-is-a-file", lambda t, c: [*CPU, "hi"], lambda t: {"HAL_CACHE_DIR": str(t / "afile")},
     "error: HAL_CACHE_DIR '{t}/afile' is a file, not a folder"),
    ("cache-entry-is-a-file", lambda t, c: [*CPU, "hi"], lambda t: {"HAL_CACHE_DIR": str(t / "cache")},
     "error: {t}/cache/synthetic-tiny-seed0: the cache entry for the built-in tiny checkpoint is a file, "
     "not a folder (remove it, or point HAL_CACHE_DIR elsewhere)"),
    ("generation-config-temperature", lambda t, c: ["--model", str(_bad_generation_config(t, c)), *CPU, "hi"],
     None, "error: {t}/genconf/generation_config.json: field 'temperature' must be >= 0, got -1.0"),
    ("nan-weight", lambda t, c: ["--model", str(_poisoned(t, c)), *CPU, "hi"], None,
     "error: {t}/nan/model.safetensors: tensor 'model.embed_tokens.weight' holds 1 non-finite value(s) in "
     "float32 (first: nan at [17, 3])"),
    ("float16-overflow", lambda t, c: ["--model", str(_scaled(t, c)), *CPU, "--dtype", "float16", "hi"], None,
     "error: generation stopped: the logits turned non-finite (NaN) at step 0 (0 = the prompt) in float16; "
     "float16 overflows easily, try bfloat16 or float32"),
]


@pytest.mark.parametrize(("argv", "env", "expected"), [c[1:] for c in GENERATE_CASES],
                         ids=[c[0] for c in GENERATE_CASES])
def test_generate_errors(tmp_path, tiny_checkpoint, monkeypatch, capsys, argv, env, expected):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "synthetic-tiny-seed0").write_text("x")
    for key, value in (env(tmp_path) if env else {}).items():
        monkeypatch.setenv(key, value)
    args = argv(tmp_path, tiny_checkpoint)
    before = _listing(tmp_path)
    code, err = _run_in_process(capsys, generate, ["--greedy", *args])
    assert code == 2 and "Traceback" not in err
    assert _error_lines(err) == [expected.format(t=tmp_path)]
    assert _listing(tmp_path) == before


SYNTHETIC_CASES = [
    ("into-proc", lambda t: ["/proc/minicpm-hal-x"],
     "error: cannot write the checkpoint to /proc/minicpm-hal-x: No such file or directory"),
    ("onto-a-file", lambda t: [str(t / "afile")], "error: {t}/afile: output path exists and is not a folder"),
    ("negative-shards", lambda t: [str(t / "o"), "--shards", "-1"],
     "error: --shards must be >= 0 (0: one per ~2 GiB), got -1"),
    ("seed-beyond-64-bits", lambda t: [str(t / "o"), "--seed", str(2**64)],
     "error: seed must be an integer in [0, 2**64), got 18446744073709551616"),
]


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in SYNTHETIC_CASES],
                         ids=[c[0] for c in SYNTHETIC_CASES])
def test_synthetic_errors(tmp_path, capsys, argv, expected):
    (tmp_path / "afile").write_text("x")
    before = _listing(tmp_path)
    code, err = _run_in_process(capsys, synthetic, argv(tmp_path))
    assert code == 2 and _error_lines(err) == [expected.format(t=tmp_path)]
    assert _listing(tmp_path) == before


def test_synthetic_disk_full_names_the_destination_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    def full(path, tensors, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synthetic, "write_safetensors", full)
    code, err = _run_in_process(capsys, synthetic, [str(tmp_path / "out" / "ckpt")])
    assert code == 2
    assert _error_lines(err) == [f"error: cannot write the checkpoint to {tmp_path / 'out' / 'ckpt'}: "
                                 "No space left on device"]
    assert _listing(tmp_path) == ["out"]


# Real processes: signals, timeout, closed pipes.

def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HAL_NPU_EMULATE"}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a parent that ignores SIGINT would pass that on


def _start(args: list[str], env: dict[str, str], new_session: bool = False) -> subprocess.Popen:
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=_default_sigint, start_new_session=new_session)
    watchdog = threading.Timer(240, proc.kill)
    watchdog.daemon = True
    watchdog.start()
    return proc


def _wait_for(proc: subprocess.Popen, marker: str) -> list[str]:
    """stderr lines up to and including the first holding ``marker`` (the work is under way)."""
    seen = []
    for line in iter(proc.stderr.readline, ""):
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"the process ended before {marker!r}: {''.join(seen)}")


# One process per case costs ~5-10 s here, so each signal path runs once: SIGTERM on compare,
# SIGINT and a process-group SIGTERM (what ``timeout`` sends) on synthetic; both share run_main.
@pytest.mark.parametrize(("sig", "code", "line"), [
    (signal.SIGTERM, 143, "validation.compare: terminated (SIGTERM)"),
], ids=["SIGTERM"])
def test_compare_signal_leaves_no_report(tmp_path, tiny_checkpoint, sig, code, line):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Prompt number {i} is about" for i in range(40)) + "\n")
    reports = tmp_path / "reports"
    proc = _start([sys.executable, "-m", "validation.compare", *CPU, "--model", str(tiny_checkpoint),
                   "--prompts", str(prompts), "--report-dir", str(reports / "r")], _env())
    seen = _wait_for(proc, "[compare] prompt 1/40")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    stderr = "".join(seen) + err
    assert proc.returncode == code, stderr
    assert _error_lines(stderr) == [line] and "Traceback" not in stderr
    assert list(reports.iterdir()) == []  # no report, no .r.*.partial staging folder


@pytest.mark.parametrize(("sig", "code", "line"), [
    (signal.SIGINT, 130, "model.synthetic: interrupted"),
], ids=["SIGINT"])
def test_synthetic_signal_leaves_no_staging_folder(tmp_path, sig, code, line):
    out = tmp_path / "out"
    proc = _start([sys.executable, "-m", "model.synthetic", str(out / "ckpt"), "--preset", "0.5b",
                   "--shards", "25"], _env())
    seen = _wait_for(proc, "wrote model-00001-of-00025.safetensors")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    stderr = "".join(seen) + err
    assert proc.returncode == code, stderr
    assert _error_lines(stderr) == [line] and "Traceback" not in stderr
    assert list(out.iterdir()) == []


def test_synthetic_sigterm_to_the_process_group_as_timeout_sends_it(tmp_path):
    """``timeout N cmd`` ends by sending SIGTERM to the command's process group; sent here the
    same way, but only once a shard is written (a real ``timeout`` is a race against the write)."""
    out = tmp_path / "out"
    proc = _start([sys.executable, "-m", "model.synthetic", str(out / "ckpt"), "--preset", "0.5b",
                   "--shards", "25"], _env(), new_session=True)
    seen = _wait_for(proc, "wrote model-00001-of-00025.safetensors")
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stderr = "".join(seen) + err
    assert proc.returncode == 143, stderr
    assert _error_lines(stderr) == ["model.synthetic: terminated (SIGTERM)"] and "Traceback" not in stderr
    assert list(out.iterdir()) == []


def test_generate_into_a_closed_pipe_ends_quietly(tiny_checkpoint):
    """``python -m model.generate ... | head -c 3``."""
    proc = _start([sys.executable, "-m", "model.generate", "--model", str(tiny_checkpoint), "--device", "cpu",
                   "--greedy", "--max-new-tokens", "64", "The capital of France is"], _env())
    assert len(proc.stdout.read(3)) == 3
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 141, err
    assert _error_lines(err) == [], err  # no traceback, no "Exception ignored ... BrokenPipeError"
