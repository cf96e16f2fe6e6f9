"""python -m validation.npu_smoke: the one command an Ascend (e.g. 910B) user runs to produce a
full report to attach to a bug report.

Steps, each recorded with its exit code and log in ``OUT/summary.md``:
  1. environment: torch / torch_npu / CANN versions, SoC, device name, ``npu-smi info``;
  2. op conformance: ``python -m validation.conformance --device npu``, then ``--mode captured``
     (the implementations decode graphs use, captured in a real NPUGraph and replayed);
  3. accuracy: ``python -m validation.compare --device npu`` on a synthetic checkpoint of every
     preset asked for (default: tiny, tiny-sala and 0.5b; add 8b / 4.1-8b / sala), and on
     ``--model PATH`` when given, once per FIA layout (``HAL_NPU_FIA_LAYOUT=TND`` / ``BSND``:
     a layout the model's head dim does not take falls back, and the report's bound ops say to what);
  4. speed, per FIA layout: prefill and decode tokens/s of the bound model on the NPU
     (synthetic 0.5b, or --model), and the same greedy decode replayed from an NPUGraph: its
     tokens/s and how many tokens equal the eager run's. Each speed step prints which attention
     implementation served prefill, decode and the graph's decode, and the graph mode
     (``auto_dispatch_capture`` with FIA lengths updated before each replay, or plain capture).

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
from hal.env import FIA_LAYOUTS
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
    p.add_argument("--skip", nargs="*", default=[], choices=("conformance", "compare", "speed", "graph", "tp"))
    p.add_argument("--layouts", nargs="+", choices=FIA_LAYOUTS, default=list(FIA_LAYOUTS),
                   help="FIA layouts to compare and time (default: TND BSND)")
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


def served(model, decode_graph: bool) -> dict[str, str]:
    """Which implementation serves attention (eager prefill / decode, and inside a decode graph)
    and the graph mode, for the report."""
    info = {"prefill": model.bound_ops["attention_prefill"], "decode": model.bound_ops["attention_decode"]}
    if decode_graph:
        from model.decode_graph import DecodeGraph

        graph = DecodeGraph(model, model.new_cache(1, 128))  # binds only; nothing is captured
        info["graph_decode"] = graph.bound_ops["attention_decode"]
        info["graph_mode"] = graph.runtime.mode
    return info


def speed(path: Path, dtype: str, new_tokens: int, decode_graph: bool = False,
          layout: str | None = None) -> dict[str, object]:
    """Prefill (128 tokens) and greedy decode tokens/s of ``path`` on the NPU, device-synchronised;
    with ``decode_graph`` also the decode replayed from an NPUGraph and its agreement with eager
    (``benchmarks/decode_graph.py``). layout: HAL_NPU_FIA_LAYOUT while binding (None: default).
    The result starts with which attention implementations served and the graph mode."""
    import hal
    from benchmarks.decode_graph import measure

    saved = os.environ.get("HAL_NPU_FIA_LAYOUT")
    if layout:
        os.environ["HAL_NPU_FIA_LAYOUT"] = layout
    try:
        model = hal.load_model(path, "npu", dtype)
        info = served(model, decode_graph)
    finally:
        if saved is None:
            os.environ.pop("HAL_NPU_FIA_LAYOUT", None)
        else:
            os.environ["HAL_NPU_FIA_LAYOUT"] = saved
    return {**info, **measure(model, new_tokens, decode_graph)}


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


def _tensor_parallel(args, out: Path, env: dict[str, str], emulate: list[str]) -> list[dict[str, object]]:
    """Tensor parallel over 2 ranks (HCCL; gloo on the emulator): compare on tiny, decode TP 1 vs 2."""
    from model.synthetic import default_checkpoint

    if not emulate:
        from backends.npu.runtime import torch_npu

        count = torch_npu().npu.device_count()
        if count < 2:
            _log(f"tp: skipped (needs 2 NPUs, {count} visible)")
            return []
    tiny = str(default_checkpoint("tiny"))
    compare = ["torch.distributed.run", "--nproc-per-node", "2", "-m", "validation.compare", "--tp", "2",
               "--device", "npu", "--dtype", args.dtype, "--model", tiny, "--report-dir", str(out / "compare-tp2"),
               *emulate]
    decode = ["benchmarks.tp_decode", "--sizes", "1,2", "--device", "npu", "--dtype", args.dtype, "--preset",
              "0.5b" if "0.5b" in args.presets else "tiny", "--out", str(out / "tp_decode.json")]
    return [_step("compare-tp2", compare, out, env),
            _step("tp-decode", decode, out, dict(env, HAL_NPU_EMULATE="1") if emulate else env)]


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
            for layout in args.layouts:
                command = ["validation.compare", "--device", "npu", "--dtype", args.dtype, "--model", str(path),
                           "--report-dir", str(out / f"compare-{name}-{layout}"), *emulate]
                steps.append(_step(f"compare-{name}-{layout}", command, out,
                                   dict(child_env, HAL_NPU_FIA_LAYOUT=layout)))
    if "speed" not in args.skip:
        path = args.model or default_checkpoint("0.5b" if "0.5b" in args.presets else args.presets[0])
        for layout in args.layouts:
            start = time.perf_counter()
            record: dict[str, object] = {"step": f"speed-{layout} ({path.name})"}
            try:
                result = speed(path, args.dtype, args.new_tokens, decode_graph="graph" not in args.skip,
                               layout=layout)
                record.update(exit=0, result=", ".join(f"{k}={v}" for k, v in result.items()))
                served_by = f"attention prefill {result['prefill']}, decode {result['decode']}"
                if "graph_decode" in result:
                    served_by += f"; decode graph {result['graph_decode']} ({result['graph_mode']})"
                _log(f"speed-{layout}: {served_by}")
            except (HalError, RuntimeError) as exc:
                text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                record.update(exit=1, result=f"error: {text}")
            record["seconds"] = round(time.perf_counter() - start, 1)
            steps.append(record)
    if "tp" not in args.skip:
        steps += _tensor_parallel(args, out, child_env, emulate)
    print(_summary(out, env_info, steps, args.emulate))
    _log(f"report folder: {out}")
    return EXIT_PASS if all(s["exit"] == 0 for s in steps) else EXIT_FAIL


if __name__ == "__main__":
    from hal.cli import run_main

    sys.exit(run_main(main, None, "validation.npu_smoke"))  # exit codes and signals: hal/cli.py
