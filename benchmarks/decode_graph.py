"""Decode speed with and without a decode graph, on cuda or npu (batch 1, greedy):

    python -m benchmarks.decode_graph --device cuda --preset 0.5b --dtype bfloat16
    python -m benchmarks.decode_graph --device npu --model /path/to/MiniCPM4-0.5B

Prints prefill tokens/s, eager decode tokens/s, graph decode tokens/s, their ratio (measured in
the same run) and how many greedy tokens the graphed run shares with the eager one. ``--emulate``
runs the NPU path on the emulator: a check of this script, its times mean nothing (EMULATED).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

from hal.api import MODEL_HELP
from hal.errors import InputError

PROMPT_TOKENS = 128


def _prompt(vocab: int) -> list[list[int]]:
    return [[(17 * i) % (vocab - 10) + 3 for i in range(PROMPT_TOKENS)]]


def synchronizer(kind: str) -> Callable[[], None]:
    """Waits for the device's queued work (timings end there)."""
    import torch

    if kind == "cuda":
        return torch.cuda.synchronize
    if kind == "npu":
        from backends.npu.runtime import torch_npu

        return torch_npu().npu.synchronize
    return lambda: None


def _decode(model, steps: int, sync, decode_graph: bool) -> tuple[list[int], float]:
    """Greedy decode of ``steps`` tokens after the prompt: returns the tokens and the seconds of
    the steps after the first (the first one captures the graph; neither mode times it)."""
    import torch

    from model.decode_graph import DecodeGraph

    prompt = torch.tensor(_prompt(model.config.vocab_size), device=model.device)
    cache = model.new_cache(1, prompt.shape[1] + steps + 1)
    with torch.inference_mode():
        logits = model.forward(prompt, cache=cache, logits_last_only=True).logits[:, -1]
        graph = DecodeGraph(model, cache) if decode_graph else None

        def step(token: torch.Tensor) -> torch.Tensor:
            if graph is not None:
                return graph.step(token)
            return model.forward(token[:, None].to(model.device), cache=cache, logits_last_only=True).logits[:, -1]

        tokens = [int(logits.float().argmax(-1))]
        logits = step(torch.tensor(tokens[-1:]))  # untimed: capture (graph) / warm-up (eager)
        tokens.append(int(logits.float().argmax(-1)))
        sync()
        start = time.perf_counter()
        for _ in range(steps - 2):
            logits = step(torch.tensor(tokens[-1:]))
            tokens.append(int(logits.float().argmax(-1)))  # a host read per token, as generate() does
        sync()
    return tokens, time.perf_counter() - start


def measure(model, new_tokens: int, decode_graph: bool = True) -> dict[str, object]:
    """Prefill tokens/s of a loaded model and greedy decode tokens/s over ``new_tokens`` steps
    (the first step untimed); with ``decode_graph`` the graphed decode as well and how many of
    its tokens equal the eager ones."""
    import torch

    if new_tokens < 3:
        raise InputError(f"--new-tokens must be >= 3 (two untimed steps), got {new_tokens}")
    kind = model.ops.context.device
    sync = synchronizer(kind)
    prompt = torch.tensor(_prompt(model.config.vocab_size))
    model.logits(prompt)  # warm-up (kernel compilation)
    sync()
    start = time.perf_counter()
    model.logits(prompt)
    sync()
    prefill = time.perf_counter() - start
    eager, seconds = _decode(model, new_tokens, sync, False)
    timed = new_tokens - 2
    result: dict[str, object] = {"prefill_tokens_per_s": round(PROMPT_TOKENS / prefill, 1),
                                 "decode_tokens_per_s": round(timed / seconds, 1), "new_tokens": len(eager)}
    if decode_graph:
        graphed, seconds = _decode(model, new_tokens, sync, True)
        same = next((i for i, (a, b) in enumerate(zip(eager, graphed)) if a != b), len(eager))
        result["graph_decode_tokens_per_s"] = round(timed / seconds, 1)
        result["graph_over_eager"] = round(result["graph_decode_tokens_per_s"] / result["decode_tokens_per_s"], 2)
        result["graph_tokens_equal_to_eager"] = f"{same}/{len(eager)}"
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_graph", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", required=True, choices=("cuda", "npu"))
    p.add_argument("--model", type=Path, default=None, help=f"{MODEL_HELP} (default: the synthetic --preset)")
    p.add_argument("--preset", default="0.5b", help="synthetic checkpoint when no --model (default: 0.5b)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--emulate", action="store_true", help="the NPU path on the emulator (times mean nothing)")
    args = p.parse_args(argv)
    if args.emulate:
        os.environ["HAL_NPU_EMULATE"] = "1"
    import hal
    from hal.errors import HalError
    from hal.probing import resolve
    from model.synthetic import default_checkpoint

    try:
        resolve(args.device)  # an unavailable device is reported before any checkpoint is written
        path = args.model or default_checkpoint(args.preset)
        model = hal.load_model(path, args.device, args.dtype)
        result = measure(model, args.new_tokens)
    except HalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    label = " (EMULATED: not hardware numbers)" if args.emulate else ""
    print(f"{path.name} on {args.device} {args.dtype}, batch 1, prompt {PROMPT_TOKENS}{label}")
    for key, value in result.items():
        print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
