"""python -m validation.npu_smoke: the one command an Ascend (e.g. 910B) user runs to produce a
full report to attach to a bug report.

Steps, each recorded with its exit code and log in ``OUT/summary.md``:
  1. environment: torch / torch_npu / CANN versions, SoC, device name, ``npu-smi info``;
  2. op conformance: ``python -m validation.conformance --device npu``, then ``--mode captured``
     (the implementations decode graphs use, captured in a real NPUGraph and replayed);
  3. accuracy: ``python -m validation.compare --device npu`` on a synthetic checkpoint of every
     preset asked for (default: tiny, tiny-sala and 0.5b; add 8b / 4.1-8b / sala), and on
     ``--model PATH`` when given;
  4. speed: prefill and decode tokens/s of the bound model on the NPU (synthetic 0.5b, or --model);
  5. decode graph: the same greedy decode replayed from an NPUGraph (``--decode-graph`` of
     ``model.generate``): its tokens/s and how many tokens equal the eager run's.

Exit 0 when every step passed, 1 when one failed, 2 when the NPU is unavailable (the reason is
printed in one line). ``--emulate`` runs everything on the torch_npu emulator (labelled
EMULATED everywhere): for checking the runbook itself, never as hardware evidence.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import hal  # noqa: F401  (first: it turns torch_npu autoload off before anything imports torch)
from hal.api import MODEL_HELP
from model.synthetic import PRESETS

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m validation.npu_smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default: reports/npu-smoke-<time>/)")
    p.add_argument("--model", type=Path, default=None, help=f"also check this real checkpoint: {MODEL_HELP}")
    p.add_argument("--presets", nargs="+", choices=PRESETS, default=["tiny", "tiny-sala", "0.5b"],
                   help="synthetic checkpoints to compare on (default: tiny tiny-sala 0.5b; 8b and sala "
                        "need ~50 GB RAM)")
    p.add_argument("--dtype", default="bfloat16", help="dtype under test (default: bfloat16)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed in the speed step")
    p.add_argument("--skip", nargs="*", default=[], choices=("conformance", "compare", "speed", "graph"))
    p.add_argument("--emulate", action="store_true", help="run on the torch_npu emulator (EMULATED)")
    return p


def _log(message: str) -> None:
    print(f"[npu_smoke] {message}", file=sys.stderr, flush=True)


def environment() -> dict[str, object]:
    """Versions and device facts; every probe is guarded (a missing piece is recorded, not raised)."""
    import torch

    import hal

    info: dict[str, object] = {"python": platform.python_version(), "machine": platform.machine(),
                               "torch": torch.__version__}
    npu = {d.name: d for d in hal.devices()}["npu"]
    info["npu"] = npu.description if npu.available else f"unavailable: {npu.reason}"
    try:
        import torch_npu

        info["torch_npu"] = getattr(torch_npu, "__version__", "?")
        info["device_name"] = torch_npu.npu.get_device_name()
        info["soc_version"] = torch_npu.npu.get_soc_version()
        if getattr(torch_npu, "EMULATED", False):
            info["cann"] = "none (emulated)"
        else:
            from torch_npu.npu.utils import get_cann_version

            info["cann"] = get_cann_version(module="CANN")
    except Exception as exc:  # noqa: BLE001 - environment capture never fails the runbook
        info.setdefault("note", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    smi = shutil.which("npu-smi")
    if smi:
        done = subprocess.run([smi, "info"], capture_output=True, text=True, timeout=60)
        info["npu_smi"] = done.stdout.strip() or done.stderr.strip()
    return info


def _step(name: str, args: list[str], out: Path, env: dict[str, str]) -> dict[str, object]:
    """Run ``python -m <args>`` with its output in ``out/<name>.log``; returns the step record."""
    _log(f"{name}: python -m {' '.join(args)}")
    start = time.perf_counter()
    with open(out / f"{name}.log", "w", encoding="utf-8") as log:
        code = subprocess.call([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    return {"step": name, "command": "python -m " + " ".join(args), "exit": code,
            "seconds": round(time.perf_counter() - start, 1), "log": f"{name}.log"}


def speed(path: Path, dtype: str, new_tokens: int, decode_graph: bool = False) -> dict[str, object]:
    """Prefill (128 tokens) and greedy decode tokens/s of ``path`` on the NPU, device-synchronised;
    with ``decode_graph`` also the decode replayed from an NPUGraph and its agreement with eager
    (``benchmarks/decode_graph.py``)."""
    import hal
    from benchmarks.decode_graph import measure

    return measure(hal.load_model(path, "npu", dtype), new_tokens, decode_graph)


def _summary(out: Path, env_info: dict[str, object], steps: list[dict[str, object]], emulated: bool) -> str:
    title = "# NPU smoke report" + (" (EMULATED: torch_npu emulator, not hardware)" if emulated else "")
    lines = [title, "", f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')}", "",
             "## Environment", ""]
    lines += [f"- {k}: {v}" for k, v in env_info.items() if k != "npu_smi"]
    if "npu_smi" in env_info:
        lines += ["", "```", str(env_info["npu_smi"]), "```"]
    lines += ["", "## Steps", "", "step | exit | seconds | result | log",
              "-----|------|---------|--------|----"]
    for s in steps:
        result = s.get("result") or ("pass" if s["exit"] == 0 else "FAIL")
        lines.append(f"{s['step']} | {s['exit']} | {s['seconds']} | {result} | {s.get('log', '')}")
    lines += ["", "Attach this folder (summary.md, summary.json, *.log, compare-*/) to the bug report."]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text, encoding="utf-8")
    data = {"emulated": emulated, "environment": env_info, "steps": steps}
    (out / "summary.json").write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.emulate:
        os.environ["HAL_NPU_EMULATE"] = "1"
    import hal
    from hal.errors import HalError
    from model.synthetic import default_checkpoint

    npu = {d.name: d for d in hal.devices()}["npu"]
    if not npu.available:
        print(f"error: device 'npu' is not available: {npu.reason}", file=sys.stderr)
        return EXIT_USAGE
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("reports") / f"npu-smoke-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    child_env = dict(os.environ)
    emulate = ["--emulate"] if args.emulate else []
    steps: list[dict[str, object]] = []
    env_info = environment()
    if "conformance" not in args.skip:
        command = ["validation.conformance", "--device", "npu", *emulate]
        steps.append(_step("conformance", command, out, child_env))
        if "graph" not in args.skip:
            steps.append(_step("conformance-captured", [*command, "--mode", "captured"], out, child_env))
    if "compare" not in args.skip:
        targets = [(f"synthetic-{p}", default_checkpoint(p)) for p in args.presets]
        targets += [("model", args.model)] if args.model else []
        for name, path in targets:
            command = ["validation.compare", "--device", "npu", "--dtype", args.dtype, "--model", str(path),
                       "--report-dir", str(out / f"compare-{name}"), *emulate]
            steps.append(_step(f"compare-{name}", command, out, child_env))
    if "speed" not in args.skip:
        path = args.model or default_checkpoint("0.5b" if "0.5b" in args.presets else args.presets[0])
        start = time.perf_counter()
        record: dict[str, object] = {"step": f"speed ({path.name})"}
        try:
            result = speed(path, args.dtype, args.new_tokens, decode_graph="graph" not in args.skip)
            record.update(exit=0, result=", ".join(f"{k}={v}" for k, v in result.items()))
        except (HalError, RuntimeError) as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            record.update(exit=1, result=f"error: {text}")
        record["seconds"] = round(time.perf_counter() - start, 1)
        steps.append(record)
    print(_summary(out, env_info, steps, args.emulate))
    _log(f"report folder: {out}")
    return EXIT_PASS if all(s["exit"] == 0 for s in steps) else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
