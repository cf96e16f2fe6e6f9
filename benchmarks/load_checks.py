"""Cost of the load-time checks on a checkpoint: the safetensors library's header validation
and the NaN/Inf scan of every weight (``model/checkpoint.py:check_finite``).

    python -m benchmarks.load_checks [--model PATH | --preset 0.5b] [--rounds 3]

Times ``load_weights`` with the checks and with each replaced by a no-op, interleaved, in
bfloat16 (zero-copy views: the scan is the first read of the pages) and float32 (converted
copies), and ``library_check`` alone per file. Prints medians; the file is read from the page
cache (one warm-up load first).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load_checks", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--preset", default="0.5b")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    from model import checkpoint, safetensors_mmap
    from model.config import load_config
    from model.synthetic import default_checkpoint

    path = args.model or default_checkpoint(args.preset)
    config = load_config(path)
    files = sorted(path.glob("*.safetensors"))
    real_finite, real_library = checkpoint.check_finite, safetensors_mmap.library_check
    header = [min(_time(lambda f=f: real_library(f)) for _ in range(20)) for f in files]
    print(f"{path}: {len(files)} file(s), {sum(f.stat().st_size for f in files) / 2**20:.0f} MiB, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"safetensors library header check: {sum(header) * 1e3:.2f} ms for all files (best of 20)")
    for dtype in (torch.bfloat16, torch.float32):
        def load() -> None:
            weights = checkpoint.load_weights(path, config, dtype, torch.device("cpu"))
            for t in weights.values():  # touch every page so both variants read the same bytes
                t.view(-1)[:: 4096 // t.element_size() or 1].sum()
            del weights

        load()  # warm-up: page cache
        times: dict[str, list[float]] = {"checks": [], "no finite scan": [], "no header check": []}
        for _ in range(args.rounds):
            for name in times:
                checkpoint.check_finite = (lambda *a: None) if name == "no finite scan" else real_finite
                no_header = name == "no header check"
                safetensors_mmap.library_check = (lambda *a: None) if no_header else real_library
                times[name].append(_time(load))
        checkpoint.check_finite, safetensors_mmap.library_check = real_finite, real_library
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{str(dtype).removeprefix('torch.')}: load with checks {med['checks']:.2f} s, "
              f"without the finite scan {med['no finite scan']:.2f} s "
              f"(scan {med['checks'] - med['no finite scan']:+.2f} s), without the header check "
              f"{med['no header check']:.2f} s; medians of {args.rounds}")
    return 0


if __name__ == "__main__":
    from hal.cli import run_main

    sys.exit(run_main(main, None, "benchmarks.load_checks"))  # exit codes and signals: hal/cli.py
