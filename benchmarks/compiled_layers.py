"""The CPU decode step with and without its decoder layers compiled by AOTInductor
(``DecodeStep(compiled=True)``, ``model/compiled_decode.py``) on the trained SmolLM2-135M.

    python -m benchmarks.compiled_layers [--formats float32 int4] [--threads 2] [--rounds 6] [--split]

Per format (``benchmarks/cpu_vs_llama.py``'s files and loading: float32 on the F32 GGUF, int4 on
the Q4_0 GGUF kept quantized with bfloat16 activations): rounds alternate the plain and the
compiled step, each round a 128-token prompt then 32 timed steps (after one untimed step, which
builds or loads the package); the median and fastest ms per token of each and their ratio.
``--split``: the compiled step's parts in loops of their own (20 passes each): the 30 compiled
layers, their 120 products alone (the same weights through the bound ops) and the logits.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.cpu_vs_llama import gguf_file, load_ours


def _step_ms(model, ids: torch.Tensor, compiled: bool, steps: int = 32) -> float:
    from model.fast_decode import DecodeStep

    cache = model.new_cache(1, ids.shape[1] + steps + 2)
    with torch.inference_mode():
        token = model.forward(ids, cache=cache, logits_last_only=True).logits[:, -1].argmax(-1)
        step = DecodeStep(model, cache, compiled=compiled)
        token = step.step(token).argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            token = step.step(token).argmax(-1)
    return (time.perf_counter() - start) / steps * 1e3


def ab(model, ids: torch.Tensor, rounds: int) -> dict[bool, list[float]]:
    times: dict[bool, list[float]] = {False: [], True: []}
    _step_ms(model, ids, True, 2)  # builds the package when it is not cached
    for _ in range(rounds):
        for compiled in (False, True):
            times[compiled].append(_step_ms(model, ids, compiled))
    return times


def split(model, ids: torch.Tensor, passes: int = 20, repeats: int = 5) -> dict[str, list[float]]:
    """ms per pass of the 30 compiled layers, their 120 products alone, and the logits."""
    from model.fast_decode import DecodeStep
    from model.minicpm import _linear

    cache = model.new_cache(1, ids.shape[1] + 4)
    out: dict[str, list[float]] = {}
    with torch.inference_mode():
        token = model.forward(ids, cache=cache, logits_last_only=True).logits[:, -1].argmax(-1)
        step = DecodeStep(model, cache, compiled=True)
        step.step(token)
        length = cache.length + 1  # the next token's slot: rewritten by every pass below, never advanced
        layers = step.layers
        layers.begin(model.rope.lookup(torch.tensor([[length - 1]])), length)
        x = torch.randn(1, 1, model.config.hidden_size).to(model.dtype)
        ffn = torch.randn(1, 1, model.config.intermediate_size).to(model.dtype)
        heads = torch.randn(1, 1, model.config.num_attention_heads * model.config.head_dim).to(model.dtype)
        ops = model.ops

        def compiled_layers():
            layers(x, x)

        def products():
            for layer in model.layers:
                _linear(ops, x, layer.qkv), _linear(ops, heads, layer.o)
                _linear(ops, x, layer.gate_up), _linear(ops, ffn, layer.down)

        def logits():
            model.tp.logits(ops, x, model.head_weight(ops))

        for _ in range(repeats):
            for name, fn in (("30 compiled layers", compiled_layers), ("their 120 products alone", products),
                             ("logits", logits)):
                start = time.perf_counter()
                for _ in range(passes):
                    fn()
                out.setdefault(name, []).append((time.perf_counter() - start) / passes * 1e3)
    return out


def main(argv: list[str] | None = None) -> int:
    from model.trained import trained_gguf

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="+", default=["float32", "int4"], choices=["float32", "int4"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--split", action="store_true", help="also time the compiled step's parts")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    source = trained_gguf()
    ids = torch.randint(0, 40000, (1, 128), generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, threads {args.threads}, {args.rounds} interleaved rounds of 32 steps")
    for fmt in args.formats:
        model = load_ours(gguf_file(source, fmt), fmt)
        times = ab(model, ids, args.rounds)
        plain, compiled = statistics.median(times[False]), statistics.median(times[True])
        print(f"{fmt}: plain {plain:.2f} ms/token (fastest {min(times[False]):.2f}), compiled {compiled:.2f} "
              f"(fastest {min(times[True]):.2f}): {plain / compiled:.2f}x")
        if args.split:
            for name, values in split(model, ids).items():
                print(f"  {name}: median {statistics.median(values):.2f} ms, fastest {min(values):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
