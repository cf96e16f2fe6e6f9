"""Decode speed and per-rank memory of tensor parallel, TP = 1 against TP = N (batch 1, greedy):

    python -m benchmarks.tp_decode --sizes 1,2                         # cpu, float32, the 0.5b preset
    python -m benchmarks.tp_decode --sizes 1,2 --device cuda --dtype bfloat16 --graph
    torchrun --nproc-per-node 2 -m benchmarks.tp_decode --tp 2 ...     # one size, by hand

``--sizes`` launches each size (``torchrun --nproc-per-node N`` for N > 1) and prints one row per
size: prefill and decode tokens/s (``benchmarks.decode_graph.measure``: the first decode steps
untimed), the weight bytes each rank holds and each rank's peak RSS (``ru_maxrss``: weights plus
torch, the interpreter and the activations). On the CPU the ranks share the machine's cores
(each rank gets cores / N threads, TP = 1 all of them): on 2 cores no speed-up is expected, and the
collectives add their own cost; the point there is correctness and memory per rank. ``--graph``
(cuda): the decode steps are also replayed from a CUDA graph that captures the NCCL collectives.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from hal.api import MODEL_HELP
from hal.errors import InputError


def _rank(args: argparse.Namespace) -> int:
    """One size, inside the launched job: every rank measures, rank 0 writes ``--out``."""
    import torch

    import hal
    from benchmarks.decode_graph import measure
    from hal import distributed
    from model.synthetic import default_checkpoint
    from model.tp import weight_bytes

    distributed.check_world(args.tp)
    if args.device == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.tp))
    path = args.model or default_checkpoint(args.preset)
    try:
        model = hal.load_model(path, args.device, args.dtype, tp=args.tp)
        result = measure(model, args.new_tokens, decode_graph=args.graph)
        group = model.tp.group
        mine = torch.tensor([weight_bytes(model), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024],
                            dtype=torch.int64, device=group.device)
        everyone = group.all_gather(mine[None], dim=0).cpu().tolist()
        record = {"tp": args.tp, "device": args.device, "dtype": args.dtype, "model": str(path),
                  "threads_per_rank": torch.get_num_threads() if args.device == "cpu" else None, **result,
                  "rank_weight_bytes": [row[0] for row in everyone],
                  "rank_peak_rss_bytes": [row[1] for row in everyone]}
        if group.rank == 0:
            text = json.dumps(record, indent=2)
            if args.out:
                Path(args.out).write_text(text + "\n", encoding="utf-8")
            print(text)
    finally:
        distributed.shutdown()
    return 0


def _launch(args: argparse.Namespace, size: int, out: Path) -> dict:
    command = ["-m", "benchmarks.tp_decode", "--tp", str(size), "--device", args.device, "--dtype", args.dtype,
               "--new-tokens", str(args.new_tokens), "--preset", args.preset, "--out", str(out)]
    command += ["--model", str(args.model)] if args.model else []
    command += ["--graph"] if args.graph else []
    command += ["--threads", str(args.threads)] if args.threads else []
    if size > 1:
        command = ["-m", "torch.distributed.run", "--nproc-per-node", str(size), *command]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.splitlines() if line.startswith(("error", "internal error"))]
        raise InputError(f"tp={size}: exited {proc.returncode}: {tail[0] if tail else proc.stderr[-300:]}")
    return json.loads(out.read_text(encoding="utf-8"))


def _sizes(args: argparse.Namespace) -> int:
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--sizes must be a comma-separated list of integers, got {args.sizes!r}") from None
    if not sizes or min(sizes) < 1:
        raise InputError(f"--sizes must list sizes >= 1, got {args.sizes!r}")
    records = []
    with tempfile.TemporaryDirectory(prefix="tp-decode-") as scratch:
        for size in sizes:
            print(f"[tp_decode] tp={size} ...", file=sys.stderr, flush=True)
            records.append(_launch(args, size, Path(scratch) / f"tp{size}.json"))
    mib = 1 << 20
    print(f"| tp | decode tok/s | prefill tok/s | weights per rank (MiB) | peak RSS per rank (MiB) |")
    print("|---:|---:|---:|---|---|")
    for r in records:
        graph = f" (graph {r['graph_decode_tokens_per_s']})" if "graph_decode_tokens_per_s" in r else ""
        print(f"| {r['tp']} | {r['decode_tokens_per_s']}{graph} | {r['prefill_tokens_per_s']} | "
              f"{', '.join(f'{b / mib:.0f}' for b in r['rank_weight_bytes'])} | "
              f"{', '.join(f'{b / mib:.0f}' for b in r['rank_peak_rss_bytes'])} |")
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return 0


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tp_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="launch these tensor-parallel sizes, e.g. 1,2 (a table)")
    p.add_argument("--tp", type=int, default=None, help="measure one size (inside torchrun --nproc-per-node N)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "npu"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--model", type=Path, default=None, help=f"{MODEL_HELP} (default: the synthetic --preset)")
    p.add_argument("--preset", default="0.5b", help="synthetic checkpoint when no --model (default: 0.5b)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="cpu threads per rank (default: cores / tp)")
    p.add_argument("--graph", action="store_true", help="also decode from a device graph (cuda)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = p.parse_args(argv)
    if (args.sizes is None) == (args.tp is None):
        raise InputError("give --sizes (launch several) or --tp (one, under torchrun)")
    return _sizes(args) if args.sizes is not None else _rank(args)


def main(argv: list[str] | None = None) -> int:
    from hal.cli import run_main

    return run_main(_main, argv, "benchmarks.tp_decode")


if __name__ == "__main__":
    sys.exit(main())
