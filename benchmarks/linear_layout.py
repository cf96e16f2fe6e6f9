"""Dense linear layouts on the CPU: ``cpu.torch`` (``F.linear`` on the checkpoint's `[O, K]` weight)
against ``cpu.torch_kn`` (the weight prepared once into a `[K, O]` contiguous tensor,
``backends/cpu/linear_kn.py``), per dtype and activation row count.

    python -m benchmarks.linear_layout [--threads 2] [--rows 1,128] [--dtypes float32 bfloat16] [--rounds 5]

One "pass" is the 120 dense products of one SmolLM2-135M forward (30 layers of qkv [960, 576],
o [576, 576], gate_up [3072, 576], down [576, 1536]; random weights). Rounds alternate the two
implementations; the median ms per pass is printed with the ratio kn / torch (below 1: kn faster).
This is what ``cpu.torch_kn``'s ``supports()`` (float32 only) was decided on; the whole-model figure
is ``python -m benchmarks.cpu_speed`` (its "linear -> cpu.torch (before)" row).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
LAYERS = 30


def _pass_ms(fn, weights: list[torch.Tensor], inputs: dict[int, torch.Tensor], repeats: int) -> float:
    fn(inputs[weights[0].shape[1]], weights[0])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        for w in weights:
            fn(inputs[w.shape[1]], w)
    return (time.perf_counter() - start) / repeats * 1e3


def measure(dtype: torch.dtype, rows: int, rounds: int) -> tuple[float, float]:
    """(median ms per pass of cpu.torch, of cpu.torch_kn)."""
    from backends.cpu.linear_kn import linear_kn, prepare_linear_kn
    from backends.cpu.ops import linear_cpu

    g = torch.Generator().manual_seed(0)
    plain = [torch.randn(*s, generator=g).to(dtype) for _ in range(LAYERS) for s in SHAPES]
    prepared = [prepare_linear_kn(w) for w in plain]
    inputs = {k: torch.randn(1, rows, k, generator=g).to(dtype) for k in {s[1] for s in SHAPES}}
    repeats = 10 if rows <= 8 else 2
    times: dict[str, list[float]] = {"torch": [], "kn": []}
    with torch.inference_mode():
        for index in range(rounds):
            order = [("torch", linear_cpu, plain), ("kn", linear_kn, prepared)]
            for name, fn, weights in (order if index % 2 == 0 else order[::-1]):
                times[name].append(_pass_ms(fn, weights, inputs, repeats))
    return statistics.median(times["torch"]), statistics.median(times["kn"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.linear_layout", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,128", help="comma-separated activation row counts")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        parser.error(f"--rows must be comma-separated integers, got {args.rows!r}")
    if args.threads < 1 or args.rounds < 1 or min(rows) < 1:
        parser.error("--threads, --rounds and every --rows value must be >= 1")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds, median ms per pass "
          f"of {LAYERS * len(SHAPES)} products")
    print("| dtype | rows | cpu.torch (F.linear, [O, K]) | cpu.torch_kn ([K, O] contiguous) | kn / torch |")
    print("|---|---|---|---|---|")
    for dtype in args.dtypes:
        for r in rows:
            plain, kn = measure(getattr(torch, dtype), r, args.rounds)
            print(f"| {dtype} | {r} | {plain:.2f} | {kn:.2f} | {kn / plain:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
