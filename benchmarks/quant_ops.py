"""Speed of the CPU quantized linears (cpu.torch, bfloat16) against the dense matmuls, on the
SmolLM2-135M decoder shapes (fused qkv, o, gate_up, down).

    python -m benchmarks.quant_ops [--threads 2] [--rows 1,128] [--repeats 200] [--crossover | --ternary-2bit]

Each cell is the median of ``--repeats`` calls after a warm-up, in microseconds, of the bound
implementation's function on its prepared weight (random containers of each format).
``--crossover`` instead times, per format and row count, torch's kernel against the on-the-fly
decoding + dense matmul (``backends/cpu/quantized.py``: what ``KERNEL_MAX_ROWS`` is chosen from).
``--ternary-2bit`` times ternary held in 2 bits (``cpu.torch_2bit``, ``backends/cpu/ternary2.py``)
against the 4-bit codes of ``cpu.torch`` (the baseline), per row ternary and groups of 64, in
interleaved rounds (the two alternate, ``--repeats // rows`` calls each per round, median of
each over 7 rounds), and prints the ratio 2-bit / 4-bit.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
FORMATS = (("linear_int4", "q4_0", 32), ("linear_int4", "gptq", 64), ("linear_int8", "q8_0", 32),
           ("linear_int8", "rtn", -1), ("linear_ternary", "bitcpm4", -1))


def _median_us(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,128")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--crossover", action="store_true", help="kernel vs decode + matmul per row count")
    p.add_argument("--ternary-2bit", action="store_true", help="ternary in 2 bits vs 4-bit codes per row count")
    args = p.parse_args(argv)
    from backends.cpu import quantized
    from hal.registry import BindContext
    from validation.opcheck import random_container

    torch.set_num_threads(args.threads)
    ctx = BindContext("cpu", torch.bfloat16, {})
    g = torch.Generator().manual_seed(0)
    if args.crossover:
        return _crossover(args, ctx, g)
    if args.ternary_2bit:
        return _ternary_2bit(args, ctx, g)
    labels = ["dense bf16", "dense fp32"] + [f"{source} g{group}" for _, source, group in FORMATS]
    print(f"threads {args.threads}, torch {torch.__version__}, median us per call")
    print("| rows | linear [O, K] | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for rows in (int(r) for r in args.rows.split(",")):
        for name, (out, k) in SHAPES.items():
            x = torch.randn(rows, k, generator=g).bfloat16()
            dense = torch.randn(out, k, generator=g).bfloat16()
            cells = [_median_us(lambda: torch.nn.functional.linear(x, dense), args.repeats)]
            xf, wf = x.float(), dense.float()
            cells.append(_median_us(lambda: torch.nn.functional.linear(xf, wf), args.repeats))
            for op, source, group in FORMATS:
                weight = random_container(g, op, source, out, k, k if group < 0 else group)
                prepared = getattr(quantized, f"prepare_{op.removeprefix('linear_')}")(weight, ctx)
                cells.append(_median_us(lambda: quantized.linear_packed(x, prepared), args.repeats))
            print(f"| {rows} | {name} [{out}, {k}] | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    return 0


def _crossover(args, ctx, g) -> int:
    from backends.cpu import quantized
    from validation.opcheck import random_container

    rows_list = [int(r) for r in args.rows.split(",")]
    print(f"threads {args.threads}, torch {torch.__version__}, median us per call: kernel / decode + matmul")
    print("| linear [O, K] | format | " + " | ".join(f"{r} rows" for r in rows_list) + " |")
    print("|---|---|" + "---|" * len(rows_list))
    for name, (out, k) in SHAPES.items():
        for op, source, group in FORMATS:
            weight = random_container(g, op, source, out, k, k if group < 0 else group)
            prepared = getattr(quantized, f"prepare_{op.removeprefix('linear_')}")(weight, ctx)
            decode = (quantized.decode_linear if isinstance(prepared, quantized.Int4Packed)
                      else quantized.decode_int8_linear)
            cells = []
            for rows in rows_list:
                x = torch.randn(rows, k, generator=g).bfloat16()
                repeats = max(3, args.repeats // rows)
                kernel = _median_us(lambda: quantized.kernel_linear(x, prepared), repeats)
                cells.append(f"{kernel:.0f} / {_median_us(lambda: decode(x, prepared), repeats):.0f}")
            print(f"| {name} [{out}, {k}] | {source} g{group} | " + " | ".join(cells) + " |")
    return 0


def _ternary_2bit(args, ctx, g) -> int:
    from backends.cpu import quantized, ternary2
    from validation.opcheck import random_container

    rows_list = [int(r) for r in args.rows.split(",")]
    print(f"threads {args.threads}, torch {torch.__version__}, median us per call over 7 interleaved rounds")
    print("| linear [O, K] | group | rows | 4-bit (cpu.torch) | 2-bit (cpu.torch_2bit) | 2-bit / 4-bit | held 2-bit / 4-bit |")
    print("|---|---|---|---|---|---|---|")
    for name, (out, k) in SHAPES.items():
        for group in (-1, 64):
            weight = random_container(g, "linear_ternary", "bitcpm4" if group < 0 else "rtn", out, k,
                                      k if group < 0 else group)
            four = quantized.prepare_ternary(weight, ctx)
            two = ternary2.prepare_ternary_2bit(weight, ctx)
            for rows in rows_list:
                x = torch.randn(rows, k, generator=g).bfloat16()
                repeats = max(3, args.repeats // rows)
                times: dict[str, list[float]] = {"4": [], "2": []}
                for _ in range(7):
                    times["4"].append(_median_us(lambda: quantized.linear_packed(x, four), repeats))
                    times["2"].append(_median_us(lambda: ternary2.linear_ternary_2bit(x, two), repeats))
                t4, t2 = statistics.median(times["4"]), statistics.median(times["2"])
                print(f"| {name} [{out}, {k}] | {'row' if group < 0 else group} | {rows} | {t4:.0f} | {t2:.0f} | "
                      f"{t2 / t4:.2f} | {two.nbytes / four.nbytes:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
