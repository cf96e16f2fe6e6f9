"""CPU speed and memory benchmarks.

    python -m benchmarks.cpu_speed [--model GGUF] [--formats float32 bfloat16 int4] [--threads 2]
                                   [--prompt-tokens 128] [--new-tokens 64] [--rounds 3]
                                   [--no-llama-cpp] [--no-memory] [--quick]

prints issue 13's table (``benchmarks/cpu_vs_llama.py``): ours against llama.cpp on the same GGUF
weights (F32, and Q4_0 for int4) in one run, decode and prefill tok/s with the ratios, weight
bytes and RSS per format. Default model: the trained SmolLM2-135M-Instruct (``python -m
model.trained --fetch``); the F32 and Q4_0 files are built from it on first use (cached).
``--quick``: 16 prompt tokens, 8 new tokens, one round (a smoke run).

    python -m benchmarks.cpu_speed --vs-transformers [--dtypes float32 bfloat16] [--prompt-tokens 128]
                                   [--new-tokens 32] [--rounds 3] [--threads N] [--no-rss]

prints the earlier table: our MiniCPM vs transformers' folded ``LlamaForCausalLM``.
It runs on the ``0.5b`` synthetic checkpoint (real MiniCPM4-0.5B shapes), written on first use into
the cache folder (``HAL_CACHE_DIR``, ~870 MB). Both models get the same dtype, the same torch
thread count, the same prompt and the same number of greedy steps, each with its own KV cache:

* prefill tokens/s = prompt tokens / time of one forward over the prompt (cache filled,
  logits of the last position only: what generation does);
* decode tokens/s  = new tokens / time of that many single-token forwards against the cache
  (greedy argmax in between).

Each figure is the median over ``--rounds`` timed rounds after one warm-up round. Peak RSS at
load is measured in a fresh subprocess per dtype: ``ru_maxrss`` after ``hal.load_model`` minus
``ru_maxrss`` after the imports, divided by the bytes of the loaded weights.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.cpu_vs_llama import FORMATS, memory_child, our_weight_bytes, run_tables

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PRESET = "0.5b"


def checkpoint(preset: str = PRESET) -> Path:
    """The synthetic benchmark checkpoint, written into the cache folder on first use."""
    from model.synthetic import default_checkpoint

    return default_checkpoint(preset)


def prompt_ids(vocab: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """A deterministic `[1, tokens]` prompt of ordinary token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab - 16, (1, tokens), generator=g)


class OursRunner:
    """Prefill through ``model.forward`` with our ``KVCache``, greedy decode through the fast CPU
    step (``model/fast_decode.py``, what ``generate`` runs on the CPU)."""

    name = "ours"

    def __init__(self, path: Path, dtype: str):
        import hal

        self.model = hal.load_model(path, device="cpu", dtype=dtype)

    def prefill(self, ids: torch.Tensor, capacity: int) -> tuple[Any, torch.Tensor]:
        cache = self.model.new_cache(ids.shape[0], capacity)
        with torch.inference_mode():
            out = self.model.forward(ids, cache=cache, logits_last_only=True)
        return cache, out.logits[:, -1].argmax(-1)

    def decode(self, cache: Any, token: torch.Tensor, steps: int) -> list[int]:
        from model.fast_decode import DecodeStep

        tokens = []
        step = DecodeStep(self.model, cache)
        with torch.inference_mode():
            for _ in range(steps):
                token = step.step(token).argmax(-1)
                tokens.append(int(token[0]))
        return tokens


class TransformersRunner:
    """Prefill and greedy decode through ``LlamaForCausalLM.forward`` with a ``DynamicCache``."""

    name = "transformers"

    def __init__(self, path: Path, dtype: str):
        from benchmarks.hf_llama import load_folded_llama

        self.model = load_folded_llama(path, DTYPES[dtype])

    def prefill(self, ids: torch.Tensor, capacity: int) -> tuple[Any, torch.Tensor]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        return out.cache, out.logits[:, -1].argmax(-1)

    def decode(self, cache: Any, token: torch.Tensor, steps: int) -> list[int]:
        tokens = []
        with torch.inference_mode():
            for _ in range(steps):
                out = self.model(input_ids=token[:, None], cache=cache, use_cache=True, logits_to_keep=1)
                cache = out.cache
                token = out.logits[:, -1].argmax(-1)
                tokens.append(int(token[0]))
        return tokens


RUNNERS: dict[str, Callable[[Path, str], Any]] = {"ours": OursRunner, "transformers": TransformersRunner}


@dataclass
class Timing:
    """Seconds per round of one implementation in one dtype, and its greedy tokens."""

    impl: str
    dtype: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: list[float]
    decode_s: list[float]
    tokens: list[int]

    def tok_s(self, phase: str, how: Callable[[list[float]], float] = min) -> float:
        """Tokens/s of ``phase`` ("prefill" or "decode") from the best (``min``) or ``median`` round."""
        if phase == "prefill":
            return self.prompt_tokens / how(self.prefill_s)
        return self.new_tokens / how(self.decode_s)


def one_round(runner: Any, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds, greedy tokens incl. the prefill's) for one prompt."""
    capacity = ids.shape[1] + new_tokens + 1
    start = time.perf_counter()
    cache, first = runner.prefill(ids, capacity)
    middle = time.perf_counter()
    tokens = runner.decode(cache, first, new_tokens)
    end = time.perf_counter()
    return middle - start, end - middle, [int(first[0])] + tokens


def measure_interleaved(runners: list[Any], dtype: str, ids: torch.Tensor, new_tokens: int, rounds: int,
                        warmup: int = 1) -> dict[str, Timing]:
    """Times the runners in alternating order, round after round, so that load from other processes
    hits them alike; ``warmup`` untimed rounds first."""
    timings = {r.name: Timing(r.name, dtype, ids.shape[1], new_tokens, [], [], []) for r in runners}
    for index in range(warmup + rounds):
        order = runners if index % 2 == 0 else runners[::-1]
        for runner in order:
            prefill_s, decode_s, tokens = one_round(runner, ids, new_tokens)
            timing = timings[runner.name]
            timing.tokens = tokens
            if index >= warmup:
                timing.prefill_s.append(prefill_s)
                timing.decode_s.append(decode_s)
    return timings


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# -- peak RSS at load (fresh subprocess) -------------------------------------------------------

def _rss_child(path: str, dtype: str) -> None:
    """Runs in a fresh interpreter: prints JSON with the load-time peak RSS and the weight bytes."""
    import hal  # noqa: F401  (imports first: they are the baseline)
    import model.minicpm  # noqa: F401
    import model.checkpoint  # noqa: F401

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    baseline_hwm = _vm_hwm()
    loaded = hal.load_model(path, device="cpu", dtype=dtype)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_hwm = _vm_hwm()
    weight_bytes = our_weight_bytes(loaded)  # distinct storages, prepared copies (cpu.fbgemm's lm_head) once
    with torch.inference_mode():
        loaded.forward(prompt_ids(loaded.config.vocab_size, 8), logits_last_only=True)
    after_forward = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"dtype": dtype, "baseline": baseline, "peak_at_load": peak,
                      "peak_after_forward": after_forward, "weight_bytes": weight_bytes,
                      "baseline_hwm": baseline_hwm, "peak_at_load_hwm": peak_hwm}))


def _vm_hwm() -> int:
    """VmHWM of this process in bytes (cross-check of ru_maxrss), 0 if unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def measure_rss(path: Path, dtype: str) -> dict[str, float]:
    """Peak RSS at load in a fresh subprocess; ratio = (peak - baseline) / weight bytes.

    Linux carries a parent's RSS high-water mark into ``ru_maxrss`` of a forked-and-exec'd child,
    so call this while the calling process is still small (before loading models), as the CLI
    and the pytest suite do."""
    command = [sys.executable, "-m", "benchmarks.cpu_speed", "--rss-child", str(path), dtype]
    result = subprocess.run(command, capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent.parent)
    data = json.loads(result.stdout.strip().splitlines()[-1])
    data["load_ratio"] = (data["peak_at_load"] - data["baseline"]) / data["weight_bytes"]
    data["forward_ratio"] = (data["peak_after_forward"] - data["baseline"]) / data["weight_bytes"]
    data["load_ratio_hwm"] = (data["peak_at_load_hwm"] - data["baseline_hwm"]) / data["weight_bytes"]
    return data


# -- CLI ---------------------------------------------------------------------------------------

def rss_table(path: Path, dtypes: list[str]) -> list[str]:
    """Markdown rows of the peak-RSS-at-load measurement, one per dtype."""
    mb = 1 << 20
    lines = ["| dtype | loaded weight bytes | peak RSS at load − baseline | ratio | (VmHWM cross-check) "
             "| peak after a first 8-token forward − baseline | ratio |", "|---|---|---|---|---|---|---|"]
    for dtype in dtypes:
        r = measure_rss(path, dtype)
        at_load = (r["peak_at_load"] - r["baseline"]) / mb
        after_forward = (r["peak_after_forward"] - r["baseline"]) / mb
        lines.append(f"| {dtype} | {r['weight_bytes'] / mb:.0f} MiB | {at_load:.0f} MiB "
                     f"| {r['load_ratio']:.2f}x | {r['load_ratio_hwm']:.2f}x | {after_forward:.0f} MiB "
                     f"| {r['forward_ratio']:.2f}x |")
    return lines


def speed_table(path: Path, dtypes: list[str], prompt_tokens: int, new_tokens: int,
                rounds: int) -> list[str]:
    """Markdown rows: tokens/s of ours and transformers per dtype and phase, best and median round."""
    lines = ["| dtype | phase | ours tok/s | transformers tok/s | ours/transformers (best) "
             "| ours/transformers (median) | same greedy tokens |", "|---|---|---|---|---|---|---|"]
    for dtype in dtypes:
        runners = [cls(path, dtype) for cls in RUNNERS.values()]
        ids = prompt_ids(runners[0].model.config.vocab_size, prompt_tokens)
        timings = measure_interleaved(runners, dtype, ids, new_tokens, rounds)
        del runners
        ours, theirs = timings["ours"], timings["transformers"]
        same = sum(a == b for a, b in zip(ours.tokens, theirs.tokens))
        for phase in ("prefill", "decode"):
            best = ours.tok_s(phase) / theirs.tok_s(phase)
            median = ours.tok_s(phase, statistics.median) / theirs.tok_s(phase, statistics.median)
            lines.append(f"| {dtype} | {phase} | {ours.tok_s(phase):.1f} | {theirs.tok_s(phase):.1f} "
                         f"| {best:.2f}x | {median:.2f}x | {same}/{len(ours.tokens)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_speed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--vs-transformers", action="store_true",
                        help="the earlier table: ours vs transformers on the synthetic 0.5b checkpoint")
    parser.add_argument("--model", type=Path, default=None,
                        help="source GGUF (default: the trained SmolLM2-135M-Instruct)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--no-llama-cpp", action="store_true", help="ours only (no llama.cpp columns)")
    parser.add_argument("--no-memory", action="store_true", help="skip the weight bytes / RSS table")
    parser.add_argument("--quick", action="store_true", help="16 prompt tokens, 8 new tokens, one round")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch (and llama.cpp) threads (default: 2; --vs-transformers: torch's choice)")
    parser.add_argument("--no-rss", action="store_true", help="--vs-transformers: skip the peak-RSS-at-load table")
    parser.add_argument("--rss-child", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", nargs=4, metavar=("ENGINE", "PATH", "FORMAT", "THREADS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        _rss_child(*args.rss_child)
        return 0
    if args.memory_child:
        engine, path, fmt, threads = args.memory_child
        memory_child(engine, path, fmt, int(threads))
        return 0
    if args.vs_transformers:
        return _vs_transformers(args)
    return _vs_llama_cpp(args)


def _vs_llama_cpp(args) -> int:
    from hal.errors import InputError

    prompt_tokens = args.prompt_tokens or (16 if args.quick else 128)
    new_tokens = args.new_tokens or (8 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)
    if min(prompt_tokens, new_tokens, rounds) < 1:
        raise InputError("--prompt-tokens, --new-tokens and --rounds must be >= 1")
    threads = args.threads or 2
    torch.set_num_threads(threads)
    if args.model is not None:
        source = args.model
        if not source.is_file() or source.suffix != ".gguf":
            raise InputError(f"--model {source}: not a .gguf file")
    else:
        from model.trained import trained_gguf

        source = trained_gguf()
    from benchmarks.engines import llama_cpp_version

    version = llama_cpp_version() if not args.no_llama_cpp else None
    print(f"model: {source}; torch {torch.__version__}, llama-cpp-python {version or 'not used'}, "
          f"threads {threads} (torch and llama.cpp), prompt {prompt_tokens} tokens, {new_tokens} greedy tokens, "
          f"{rounds} timed rounds (+1 warm-up), engines interleaved; load average before: {load_average()}")
    lines = run_tables(source, args.formats, prompt_tokens, new_tokens, rounds, threads,
                       llama_cpp=not args.no_llama_cpp, memory=not args.no_memory)
    print("\n".join([""] + lines))
    print(f"\nload average after: {load_average()}")
    return 0


def _vs_transformers(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    prompt_tokens, new_tokens, rounds = args.prompt_tokens or 128, args.new_tokens or 32, args.rounds or 3
    path = checkpoint()
    import transformers

    print(f"checkpoint: {path} (synthetic {PRESET})")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, prompt {prompt_tokens} tokens, "
          f"{new_tokens} new tokens, {rounds} timed rounds "
          f"(+1 warm-up), ours and transformers interleaved; load average before: {load_average()}")
    if not args.no_rss:  # first, while this process is small (see measure_rss)
        rss = rss_table(path, args.dtypes)
    print("\n".join([""] + speed_table(path, args.dtypes, prompt_tokens, new_tokens, rounds)))
    if not args.no_rss:
        print("\n".join([""] + rss))
    print(f"\nload average after: {load_average()}")
    return 0


if __name__ == "__main__":
    from hal.cli import run_main

    sys.exit(run_main(main, None, "benchmarks.cpu_speed"))  # exit codes and signals: hal/cli.py
