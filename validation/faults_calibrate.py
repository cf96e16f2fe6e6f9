"""python -m validation.faults_calibrate: the calibration behind the pass rule's factors.

Runs ``validation.compare``'s harness on one model for every correct implementation (CPU
bfloat16, CPU float16, the emulated NPU in bfloat16) and every fault of ``validation/faults.py``
(injected into CPU bfloat16), and prints one Markdown row per case and metric: floor, device
value, ratio to the floor, verdict. The table in validation/README.md is this output.

    python -m validation.faults_calibrate --model tiny
    python -m validation.faults_calibrate --model /work/SmolLM2-135M-Instruct.Q4_1.gguf --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

CORRECT = (("cpu", "bfloat16"), ("cpu", "float16"), ("npu", "bfloat16"))


def _model_path(name: str) -> Path:
    from model.synthetic import PRESETS, default_checkpoint

    return default_checkpoint(name) if name in PRESETS else Path(name)


def cases(include_npu: bool) -> list[tuple[str, str, str | None]]:
    """(device, dtype, fault) for every calibrated case."""
    from validation.faults import FAULTS

    out = [(d, t, None) for d, t in CORRECT if include_npu or d != "npu"]
    return out + [("cpu", "bfloat16", name) for name in FAULTS]


def run_case(path: Path, device: str, dtype: str, fault: str | None, positions: int,
             reuse: dict[Any, Any]) -> dict[str, Any]:
    from validation import harness, prompts

    settings = harness.Settings(model=path, device=device, dtype=dtype, prompts=list(prompts.DEFAULT_PROMPTS),
                                positions=positions, fault=fault)
    started = time.perf_counter()
    report = harness.run(settings, reuse=reuse)
    label = f"{device}{' (EMULATED)' if report['emulated'] else ''} {dtype}" + (f" + {fault}" if fault else "")
    return {"case": label, "device": device, "dtype": dtype, "fault": fault, "passed": report["passed"],
            "metrics": report["verdict"]["metrics"], "floor": report["floor"],
            "seed_rule": report["seed_rule"], "seconds": round(time.perf_counter() - started, 1)}


def markdown(model: str, rows: list[dict[str, Any]]) -> str:
    lines = ["| model | case | metric | floor | device | ratio | verdict |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for m in row["metrics"]:
            lines.append(f"| {model} | {row['case']} | {m['metric']} | {m['floor']:.3g} | {m['device']:.3g} | "
                         f"{m['ratio']:.3g} | {'PASS' if m['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m validation.faults_calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a synthetic preset (tiny, tiny-sala) or a checkpoint")
    p.add_argument("--positions", type=int, default=4)
    p.add_argument("--no-npu", action="store_true", help="skip the emulated NPU case")
    p.add_argument("--only", action="append", default=[], help="run only these fault names (or 'correct')")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    os.environ["HAL_NPU_EMULATE"] = "1"  # the NPU case is the emulator; set before any probing
    import torch

    torch.set_num_threads(1)
    path = _model_path(args.model)
    reuse: dict[Any, Any] = {}
    rows = []
    for device, dtype, fault in cases(not args.no_npu):
        if args.only and (fault or "correct") not in args.only:
            continue
        try:
            row = run_case(path, device, dtype, fault, args.positions, reuse)
        except Exception as exc:  # a refused case is a calibration result too
            row = {"case": f"{device} {dtype}" + (f" + {fault}" if fault else ""), "error": str(exc).splitlines()[0],
                   "metrics": []}
        rows.append(row)
        status = row.get("error") or ("PASS" if row["passed"] else "FAIL")
        ratios = ", ".join(f"{m['metric']} {m['ratio']:.3g}" for m in row["metrics"])
        print(f"[calibrate] {row['case']}: {status} ({ratios}) {row.get('seconds', '')} s", file=sys.stderr, flush=True)
    print(markdown(args.model if not Path(args.model).exists() else Path(args.model).name, rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
