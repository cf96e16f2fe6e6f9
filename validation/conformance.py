"""python -m validation.conformance: every catalogue op of a backend against the CPU float32
reference (ggml's test-backend-ops, in Python).

    python -m validation.conformance --device cpu                  # test mode: one line per case
    python -m validation.conformance --device cpu --op rms_norm -p 'T=63'
    python -m validation.conformance --mode support                # op x backend matrix, with reasons
    python -m validation.conformance --device npu --mode captured  # capturable impls inside a graph
    python -m validation.conformance --coverage                    # catalogue ops without a grid

``--mode captured`` runs each ``capturable`` implementation captured in a device graph and
replayed on other inputs (validation/capture.py): the device's real CUDA graph / NPUGraph, the
emulated NPUGraph on cpu and under --emulate.

Exit 0 when every supported case meets its catalogue NMSE tolerance, 1 when one fails, 2 for a
usage error or an unavailable device.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Iterable

from hal import probing
from hal.errors import HalError, InputError
from hal.graphs import graph_runtime
from hal.ops import CATALOGUE
from hal.registry import BACKEND_PACKAGES, Impl, implementations
from validation import grid, opcheck
from validation.capture import check_captured


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m validation.conformance", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu",
                   help="backend under test: cpu, cuda, npu or auto (default: cpu)")
    p.add_argument("--mode", choices=("test", "support", "captured"), default="test")
    p.add_argument("--op", action="append", default=[], help="only this op (repeatable)")
    p.add_argument("-p", "--pattern", default=None, metavar="REGEX", help="only cases whose label matches")
    p.add_argument("--dtype", action="append", default=[], help="only this dtype (repeatable)")
    p.add_argument("--coverage", action="store_true", help="list catalogue ops that have no conformance grid")
    p.add_argument("--emulate", action="store_true", help="use the torch_npu emulator for --device npu")
    return p


def _impls(op: str, backend: str) -> list[Impl]:
    """The backend's implementations of ``op`` under test (the judge itself is not tested)."""
    return [i for i in implementations(op, backend) if i.name != "reference"]


def run_tests(device: str, ops: Iterable[str], dtypes: list[str], pattern: str | None,
              captured: bool = False) -> int:
    results: list[opcheck.CaseResult] = []
    regex = re.compile(pattern) if pattern else None
    runtime = None if device == "cpu" or not captured else graph_runtime(device)
    for op in ops:
        impls = [i for i in _impls(op, device) if i.capturable or not captured]
        if not impls:
            print(f"{op}: no {'capturable ' if captured else ''}{device} implementation registered")
            continue
        for c in grid.grid(op, dtypes or None):
            if regex and not regex.search(c.label):
                continue
            for impl in impls:
                if captured:
                    result = check_captured(c, impl, device, runtime)
                else:
                    result = opcheck.check_impl(c, impl, device)
                results.append(result)
                print(result.line(), flush=True)
    failed = [r for r in results if not r.passed]
    skipped = sum(r.status == "not supported" for r in results)
    print(f"\n{len(results) - len(failed) - skipped}/{len(results) - skipped} passed"
          + (f" ({skipped} not supported)" if skipped else ""))
    for r in failed:
        detail = f" NMSE {r.error:.2e}" if r.status == "FAIL" else f" {r.reason}"
        print(f"  FAILED: {r.case.label} [{r.impl}] {r.status}{detail}")
    plain: dict[str, set[str]] = {}
    for r in results:
        plain.setdefault(r.impl, set()).update(r.extra.get("plain_ops", ()))
    if any(plain.values()):  # captured mode: the graph recorded ops that are not torch_npu (aclnn) ops
        print("\ncapture unverified on hardware (plain torch ops in the graph; only aclnn ops are "
              "documented to capture):")
        for impl, ops_seen in sorted(plain.items()):
            if ops_seen:
                print(f"  {impl}: {', '.join(sorted(ops_seen))}")
    return 1 if failed else 0


def run_support(ops: Iterable[str], dtypes: list[str]) -> int:
    """Per op and backend: which implementation would serve the grid's cases, or why none does."""
    for op in ops:
        print(op)
        for backend in BACKEND_PACKAGES:
            impls = _impls(op, backend)
            if not impls:
                print(f"  {backend:<5} -  no implementation registered")
                continue
            for impl in impls:
                reasons = sorted({r for c in grid.grid(op, dtypes or None)
                                  if (r := impl.supports(c.context(backend))) is not None})
                state = "supported" if not reasons else "partly supported: " + "; ".join(reasons)
                print(f"  {backend:<5} {impl.qualname}: {state}")
    return 0


def coverage() -> int:
    missing = []
    for op in CATALOGUE:
        try:
            grid.grid(op)
        except KeyError:
            missing.append(op)
    if missing:
        print("ops without cases: " + ", ".join(missing))
    else:
        print("every catalogue op has conformance cases")
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.emulate:
        os.environ["HAL_NPU_EMULATE"] = "1"
    try:
        unknown = [o for o in args.op if o not in CATALOGUE]
        if unknown:
            raise InputError(f"unknown op(s) {', '.join(unknown)}; the catalogue has: {', '.join(CATALOGUE)}")
        bad = [d for d in args.dtype if d not in opcheck.TORCH_DTYPE]
        if bad:
            choices = ", ".join(opcheck.TORCH_DTYPE)
            raise InputError(f"unknown dtype(s) {', '.join(bad)}; choose from {choices}")
        if args.pattern:
            try:
                re.compile(args.pattern)
            except re.error as exc:
                raise InputError(f"-p {args.pattern!r}: not a regular expression ({exc})") from None
        ops = args.op or list(CATALOGUE)
        if args.coverage:
            return coverage()
        if args.mode == "support":
            return run_support(ops, args.dtype)
        device = probing.resolve(args.device)
        return run_tests(device, ops, args.dtype, args.pattern, captured=args.mode == "captured")
    except HalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from hal.cli import run_main

    sys.exit(run_main(main, None, "validation.conformance"))  # exit codes and signals: hal/cli.py
