"""The CPU lm_head: ``cpu.fbgemm``'s packed float16 copy (``backends/cpu/logits_fp16.py``) against the
chunked float32 path it replaces (``logits_cpu``), op by op and in whole-model decode, one process.

    python -m benchmarks.lm_head [--threads 1,2] [--rows 1,128] [--rounds 7]
    python -m benchmarks.lm_head --model [GGUF] [--threads 1,2] [--new-tokens 32] [--rounds 5]

Op mode: x `[M, 576]` bfloat16 times a random N(0, 0.05) bfloat16 lm_head `[49152, 576]` (SmolLM2's),
per thread count and row count M, in interleaved rounds: ``chunked`` (``logits_cpu``, the before),
``fbgemm`` (the prepared copy), ``f32 mm`` (``F.linear`` on a float32 copy of the weight: what the
upcast costs at best, 2x the memory), ``onednn fp16`` (``torch.ops.onednn.linear_dynamic_fp16``, the
other packed float16 GEMM) and ``bf16 mm`` (bfloat16 output: breaks the logits contract, for scale).
Median ms per call, speed ratio to ``chunked``, NMSE against float64.

Model mode: the GGUF (default: the trained SmolLM2-135M-Instruct Q4_1) loaded in bfloat16 dense
(``quantize="dequantize"``) and kept quantized (int4), each decoded greedily through the fast decode
step with the packed lm_head and, interleaved round by round, through a copy of the same model
whose logits op receives the dense lm_head (the chunked path): median decode tok/s, the ratio, the
greedy tokens' agreement and the packed copy's bytes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

VOCAB, WIDTH = 49152, 576


def _ms(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def _nmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(((out.double() - ref) ** 2).sum() / (ref ** 2).sum())


def op_table(threads: list[int], rows: list[int], rounds: int) -> list[str]:
    from backends.cpu.logits_fp16 import logits_fp16, prepare_logits_fp16
    from backends.cpu.ops import logits_cpu

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(VOCAB, WIDTH, generator=g) * 0.05).bfloat16()
    packed = prepare_logits_fp16(weight)
    full = weight.float()
    onednn = torch.ops.onednn.linear_prepack_fp16(full, None)
    lines = ["| rows | threads | " + " | ".join(f"{n} ms (x chunked)" for n in _names()) + " |",
             "|---|---|" + "---|" * len(_names())]
    nmse_line = []
    for m in rows:
        x = torch.randn(m, WIDTH, generator=g).bfloat16()
        fns = {"chunked": lambda: logits_cpu(x, weight), "fbgemm": lambda: logits_fp16(x, packed),
               "f32 mm": lambda: torch.nn.functional.linear(x.float(), full),
               "onednn fp16": lambda: torch.ops.onednn.linear_dynamic_fp16(x.float(), onednn, None),
               "bf16 mm": lambda: torch.nn.functional.linear(x, weight)}
        ref = x.double() @ weight.double().t()
        nmse_line.append(f"M={m}: " + ", ".join(f"{k} {_nmse(ref, fn()):.1e}" for k, fn in fns.items()))
        calls = max(1, 8 // m) if m > 1 else 10
        for t in threads:
            torch.set_num_threads(t)
            times = {k: [] for k in fns}
            for fn in fns.values():
                fn()
            for index in range(rounds):
                for k in (list(fns) if index % 2 == 0 else list(fns)[::-1]):
                    times[k].append(_ms(fns[k], calls))
            med = {k: statistics.median(v) for k, v in times.items()}
            lines.append(f"| {m} | {t} | " + " | ".join(f"{med[k]:.2f} ({med['chunked'] / med[k]:.2f}x)"
                                                         for k in fns) + " |")
    return lines + ["", "NMSE vs float64: " + "; ".join(nmse_line)]


def _names() -> list[str]:
    return ["chunked", "fbgemm", "f32 mm", "onednn fp16", "bf16 mm"]


def _decode(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """Seconds of ``new_tokens`` fast decode steps after a prefill of ``ids``, and the tokens."""
    from model.fast_decode import DecodeStep

    cache = model.new_cache(1, ids.shape[1] + new_tokens + 1)
    with torch.inference_mode():
        token = model.forward(ids, cache=cache, logits_last_only=True).logits[:, -1].argmax(-1)
        step = DecodeStep(model, cache)
        tokens = []
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = step.step(token).argmax(-1)
            tokens.append(int(token[0]))
        return time.perf_counter() - start, tokens


def model_table(path, threads: list[int], prompt_tokens: int, new_tokens: int, rounds: int) -> list[str]:
    import hal
    from benchmarks.cpu_speed import prompt_ids
    from benchmarks.cpu_vs_llama import our_weight_bytes, without_prepared_head

    lines = ["| weights | threads | decode tok/s, packed lm_head | chunked lm_head (before) | ratio | "
             "greedy tokens equal | packed copy | weight bytes held (before) |", "|---|---|---|---|---|---|---|---|"]
    for label, quantize in (("bfloat16 (dequantized)", "dequantize"), ("int4 (Q4_1 kept)", None)):
        model = hal.load_model(path, "cpu", "bfloat16", quantize=quantize)
        if model.head is None:
            lines.append(f"| {label} | | logits bound to {model.bound_ops['logits']}: no packed lm_head | | | | | |")
            continue
        plain = without_prepared_head(model)
        ids = prompt_ids(model.config.vocab_size, prompt_tokens)
        for t in threads:
            torch.set_num_threads(t)
            runs = {"packed": [], "chunked": []}
            tokens = {}
            for index in range(rounds + 1):
                for name in (("packed", "chunked") if index % 2 == 0 else ("chunked", "packed")):
                    seconds, tokens[name] = _decode(model if name == "packed" else plain, ids, new_tokens)
                    if index:  # the first round warms up
                        runs[name].append(new_tokens / seconds)
            fast, slow = statistics.median(runs["packed"]), statistics.median(runs["chunked"])
            same = sum(a == b for a, b in zip(tokens["packed"], tokens["chunked"]))
            held = our_weight_bytes(model)
            lines.append(f"| {label} | {t} | {fast:.1f} | {slow:.1f} | {fast / slow:.2f}x | {same}/{new_tokens} | "
                         f"{model.head.prepared_bytes / 2**20:.1f} MiB | {held / 2**20:.1f} MiB "
                         f"({(held - model.head.prepared_bytes) / 2**20:.1f} MiB) |")
        del model, plain
    return lines


def main(argv: list[str] | None = None) -> int:
    from benchmarks.cpu_speed import load_average

    p = argparse.ArgumentParser(prog="python -m benchmarks.lm_head", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rows", default="1,128")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--model", nargs="?", const="trained", default=None,
                   help="decode mode on this GGUF (default: the trained SmolLM2 Q4_1)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    print(f"torch {torch.__version__}; load average before: {load_average()}")
    if args.model is None:
        lines = op_table(threads, [int(r) for r in args.rows.split(",")], args.rounds)
    else:
        from model.trained import trained_gguf

        path = trained_gguf() if args.model == "trained" else args.model
        print(f"model: {path}; prompt {args.prompt_tokens} tokens, {args.new_tokens} greedy tokens, "
              f"{args.rounds} timed rounds (+1 warm-up), packed and chunked interleaved")
        lines = model_table(path, threads, args.prompt_tokens, args.new_tokens, args.rounds)
    print("\n".join(lines))
    print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
