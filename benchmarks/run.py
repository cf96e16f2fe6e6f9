"""Seed 004's performance tables for any device and model, with the baselines measured in the same run:

    python -m benchmarks.run --device cpu [--model PATH | --preset NAME] [--dtype D] [--threads N]
                             [--json OUT.json] [--markdown OUT.md] [--quick]

Tables (``benchmarks/suite.py``): batch-10 throughput at max_tokens 32 / 64 / 128, a single
128-token request, long-context prefill tok/s and decode ms/token at 252 tokens and 4k / 32k
where the model allows, memory and start-up, and the bound ops on the model's shapes. Baselines
(``benchmarks/engines.py``): transformers on the same weights with eager and sdpa attention (same
dtype, device and threads), llama.cpp through llama-cpp-python on CPU when the model is a GGUF
and the package is installed, torch SDPA beside the attention ops. Every ratio is ours over the
baseline (> 1: ours is better) from the same run; ``python -m benchmarks.compare`` gates them.

Default model: the trained SmolLM2-135M-Instruct where this checkout has it, else the synthetic
``tiny`` preset. ``--quick`` shortens every table (a smoke run: under a minute on tiny).
``--emulate`` runs ``--device npu`` on the emulator: its times are CPU times, labelled EMULATED.
Exit codes: 0 done, 2 bad input / unavailable device, 3 internal error.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCHEMA = "minicpm-hal-bench/1"
DEFAULT_PRESET = "tiny"


def trained_model() -> Path | None:
    """The trained SmolLM2-135M-Instruct GGUF when this checkout has ``model/trained.py`` and the
    file is fetched (``python -m model.trained --fetch``), else None."""
    try:
        from model import trained
    except ImportError:
        return None
    from hal.errors import HalError

    try:
        return Path(trained.trained_gguf())
    except HalError:
        return None


def default_model() -> tuple[Path, str]:
    """(checkpoint path, name) of the default benchmark model: trained where present, else tiny."""
    trained = trained_model()
    if trained is not None:
        return trained, "SmolLM2-135M-Instruct (trained)"
    from model.synthetic import default_checkpoint

    return default_checkpoint(DEFAULT_PRESET), f"synthetic {DEFAULT_PRESET}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: str, argv: list[str]) -> dict[str, Any]:
    """Versions, device, threads, machine and the load average at the start (the end is added later)."""
    import torch

    from benchmarks.engines import llama_cpp_version
    from benchmarks.suite import load_average
    from validation.environment import collect, package_version

    name = _cpu_model()
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    elif device == "npu":
        from backends.npu.runtime import torch_npu

        name = torch_npu().npu.get_device_name(0)
    from hal import env as hal_env

    base = collect(name)
    emulated = device == "npu" and hal_env.npu_emulate()
    return {
        "emulated": emulated,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.run " + shlex.join(argv),
        "device": device, "device_name": name, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(), "memory_gib": base["memory_gib"],
        "os": base["os"], "load_average_start": load_average(), "load_average_end": None,
        "versions": {"python": base["python"], "torch": torch.__version__,
                     "transformers": package_version("transformers"), "llama-cpp-python": llama_cpp_version(),
                     "triton": base["triton"], "torch_npu": base["torch_npu"], "cuda": base["cuda_runtime"],
                     "cann": base["cann"], "driver": base["driver"], "minicpm-hal commit": _git_commit()},
    }


def _warm(engine: Any, vocab: int) -> float:
    """Seconds of a first 2-token generate (kernel compilation, allocator warm-up)."""
    from benchmarks.suite import prompt_ids

    start = time.perf_counter()
    engine.generate([prompt_ids(vocab, 8, seed=1)], 2)
    return time.perf_counter() - start


def load_ours(path: Path, device: str, dtype: str) -> tuple[Any, float, int]:
    """(our engine, init seconds = load + a first generate, peak bytes right after): loaded first,
    so its peak is measured before any baseline is in memory."""
    from benchmarks.engines import OursEngine
    from benchmarks.suite import peak_memory_bytes

    ours = OursEngine(path, device, dtype)
    init = ours.load_s + _warm(ours, ours.model.config.vocab_size)
    return ours, init, peak_memory_bytes(device)


def load_baselines(path: Path, device: str, dtype: str, vocab: int, context: int) -> tuple[list[Any], dict, list]:
    """(baseline engines, init seconds by name, [(name, reason)] of those that cannot run here).
    transformers eager and sdpa share one loaded model; llama.cpp gets a ``context``-token window."""
    import torch

    from benchmarks.engines import LlamaCppEngine, TransformersEngine, Unavailable
    from hal.api import parse_dtype

    sdpa = TransformersEngine(path, device, parse_dtype(dtype))
    eager = TransformersEngine(path, device, parse_dtype(dtype), loaded=sdpa.model, attention="eager")
    eager.load_s = sdpa.load_s
    engines: list[Any] = [sdpa, eager]
    init = {e.name: e.load_s + _warm(e, vocab) for e in engines}
    missing = []
    try:
        llama = LlamaCppEngine(path, device, context, torch.get_num_threads())
        init[llama.name] = llama.load_s + _warm(llama, vocab)
        engines.append(llama)
    except Unavailable as exc:
        missing.append(("llama.cpp", str(exc)))
    return engines, init, missing


def measure(path: Path, name: str, device: str, dtype: str | None, plan, argv: list[str],
            progress: bool = True) -> dict[str, Any]:
    """The whole result document (see benchmarks/tables.py for its Markdown)."""
    from tqdm import tqdm

    from benchmarks import suite
    from hal.api import dtype_name, parse_dtype

    env = environment(device, argv)
    dtype = dtype_name(parse_dtype(dtype or ("float32" if device == "cpu" else "bfloat16")))
    bar = tqdm(total=2, desc="benchmarks.run", unit="step", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)

    def step(what: str) -> None:
        bar.set_postfix_str(what[:40])
        bar.update(1)

    ours, ours_init, ours_peak = load_ours(path, device, dtype)
    step("loaded ours")
    cfg = ours.model.config
    long_cases = suite.long_cases(cfg.max_position_embeddings, plan)
    context = max([512] + [length + plan.long_decode + 8 for _, length in long_cases])
    baselines, init, missing = load_baselines(path, device, dtype, cfg.vocab_size, context)
    init["ours"] = ours_init
    step("loaded baselines")
    engines = [ours] + baselines + [_Missing(n, reason) for n, reason in missing]
    cases = len(plan.max_tokens) + 1 + len(long_cases)
    bar.total = 2 + cases * len(engines) + suite.ops_steps(ours.model)
    bar.refresh()
    rec = suite.Recorder(step=step)
    suite.throughput(rec, engines, cfg.vocab_size, plan)
    suite.single(rec, engines, cfg.vocab_size, plan)
    suite.long_context(rec, engines, cfg.vocab_size, cfg.num_attention_heads, cfg.max_position_embeddings,
                       device, plan)
    suite.ops(rec, ours.model, device, plan)
    suite.memory(rec, [ours] + baselines, init, {"ours": ours_peak}, device)
    for engine_name, reason in missing:
        rec.skip("memory", "load", engine_name, reason)
    bar.close()
    env["load_average_end"] = suite.load_average()
    plan_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(plan).items()}
    plan_dict["single_prompt"] = suite.SINGLE_PROMPT
    return {
        "schema": SCHEMA,
        "environment": env,
        "model": {"name": name, "path": str(path), "dtype": dtype,
                  "max_position_embeddings": cfg.max_position_embeddings, "bound_ops": ours.model.bound_ops},
        "plan": plan_dict,
        "llama_cpp_plain_buffers": next((e.plain_buffers for e in baselines if e.name == "llama.cpp"), None),
        "rows": rec.rows,
        "greedy": rec.greedy,
        "ratios": suite.ratios(rec.rows),
    }


class _Missing:
    """An engine that could not be built: every case is a skipped row with its reason."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def generate(self, prompts, new_tokens):
        from benchmarks.engines import Unavailable

        raise Unavailable(self.reason)


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same folder (no partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, npu or auto (default: auto)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None, help="checkpoint folder or .gguf file")
    source.add_argument("--preset", default=None, help="a synthetic preset (tiny, 0.5b, ...)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on cpu, "
                                                  "bfloat16 elsewhere)")
    p.add_argument("--threads", type=int, default=None, help="torch (and llama.cpp) threads")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the result document here")
    p.add_argument("--markdown", type=Path, default=None, metavar="OUT", help="write the tables here")
    p.add_argument("--quick", action="store_true", help="shortened tables (smoke run)")
    p.add_argument("--rounds", type=int, default=None, help="timed calls per case, the fastest kept (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--emulate", action="store_true",
                   help="--device npu on the torch_npu emulator (times are CPU times: EMULATED, not hardware)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.emulate:
        os.environ["HAL_NPU_EMULATE"] = "1"
    import torch

    from benchmarks import suite
    from benchmarks.tables import markdown
    from hal.errors import HalError
    from hal.probing import resolve
    from model.synthetic import PRESETS, default_checkpoint

    try:
        device = resolve(args.device)
        if args.threads is not None:
            if args.threads < 1:
                raise HalError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.rounds is not None and args.rounds < 1:
            raise HalError(f"--rounds must be >= 1, got {args.rounds}")
        if args.model is not None:
            if not args.model.exists():
                raise HalError(f"{args.model}: model not found")
            path, name = args.model, args.model.name
        elif args.preset is not None:
            if args.preset not in PRESETS:
                raise HalError(f"unknown preset {args.preset!r}; choose one of: {', '.join(PRESETS)}")
            path, name = default_checkpoint(args.preset), f"synthetic {args.preset}"
        else:
            path, name = default_model()
        plan = suite.QUICK if args.quick else suite.Plan()
        if args.rounds is not None:
            plan = suite.Plan(**{**vars(plan), "rounds": args.rounds})
        result = measure(path, name, device, args.dtype, plan, argv, progress=not args.no_progress)
    except HalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001  (a bug here, not bad input: exit 3)
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    text = markdown(result)
    print(text)
    if args.json is not None:
        write_atomic(args.json, json.dumps(result, indent=1, allow_nan=False) + "\n")
    if args.markdown is not None:
        write_atomic(args.markdown, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
