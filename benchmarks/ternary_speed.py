"""Whole-model speed of ternary held in 2 bits (``cpu.torch_2bit``) against the 4-bit codes of the
default ``cpu.torch``, on one ternary checkpoint in bfloat16 on the CPU.

    python -m benchmarks.ternary_speed CHECKPOINT [--threads 2] [--prompt-tokens 128,512] [--new-tokens 32]
                                       [--rounds 3]

CHECKPOINT: a fake-quantized ternary folder (``python -m model.quantize SRC DST --format ternary``),
loaded twice with ``quantize="ternary"``, once with ``prefer={"linear_ternary": "cpu.torch_2bit"}``.
Per prompt length, both models run ``benchmarks.cpu_speed``'s rounds (prefill through
``model.forward``, greedy decode through the fast CPU step) in alternating order after a warm-up
round; the table gives the median tok/s of each and the ratio 2-bit / 4-bit, and whether their
greedy tokens agree (they may differ where two logits are within the extra bfloat16 rounding).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.cpu_speed import OursRunner, load_average, measure_interleaved, prompt_ids

PREFER = {"linear_ternary": "cpu.torch_2bit"}


class TernaryRunner(OursRunner):
    """:class:`benchmarks.cpu_speed.OursRunner` on a ternary checkpoint packed at load."""

    def __init__(self, path: Path, name: str, prefer: dict[str, str] | None):
        import hal

        self.name = name
        self.model = hal.load_model(path, device="cpu", dtype="bfloat16", quantize="ternary", prefer=prefer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ternary_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", default="128,512")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runners = [TernaryRunner(args.checkpoint, "4-bit", None), TernaryRunner(args.checkpoint, "2-bit", PREFER)]
    bound = [r.model.bound_ops["linear_ternary"] for r in runners]
    if bound != ["cpu.torch", "cpu.torch_2bit"]:
        raise SystemExit(f"error: expected cpu.torch and cpu.torch_2bit, bound {bound}")
    print(f"{args.checkpoint}, bfloat16, threads {args.threads}, torch {torch.__version__}, "
          f"load at start: {load_average()}")
    print("| prompt | new | prefill tok/s 4-bit | 2-bit | 2-bit / 4-bit | decode tok/s 4-bit | 2-bit | "
          "2-bit / 4-bit | same greedy tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    vocab = runners[0].model.config.vocab_size
    for tokens in (int(t) for t in args.prompt_tokens.split(",")):
        ids = prompt_ids(vocab, tokens)
        t = measure_interleaved(runners, "bfloat16", ids, args.new_tokens, args.rounds)
        four, two = t["4-bit"], t["2-bit"]
        cells = []
        for phase in ("prefill", "decode"):
            a, b = four.tok_s(phase, statistics.median), two.tok_s(phase, statistics.median)
            cells += [f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}"]
        print(f"| {tokens} | {args.new_tokens} | " + " | ".join(cells) + f" | {four.tokens == two.tokens} |")
    print(f"\nload at end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
