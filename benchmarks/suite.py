"""The measurements behind ``python -m benchmarks.run``: seed 004's performance tables for our
model and the baselines of the same run, as plain rows.

A row is ``{"table", "case", "engine", "metrics": {...}}`` or, where an engine cannot run the
case, ``{"table", "case", "engine", "skipped": reason}``. Tables (seed 004's "性能评测" section):

* ``throughput``: batch of ``Plan.batch`` prompts, greedy ``max_tokens`` each: total seconds,
  input tok/s (prompt tokens / total), output tok/s (new tokens / total).
* ``single``: one 11-token prompt, ``Plan.single_tokens`` new tokens: total seconds, output tok/s,
  time to first token.
* ``long``: one prompt of 252 tokens and, where max_position_embeddings allows, a 4k / 32k
  context (prompt + decode steps = 4096 / 32768): prefill tok/s (prompt tokens / time to the
  first token) and decode ms/token (the later tokens).
* ``memory``: load seconds, init seconds (load + a first 2-token generate), weight bytes, KV
  bytes per token, KV capacity in tokens at the free memory now, peak memory.
* ``ops``: median ms of each bound op on the model's shapes (prefill T = 252, decode T = 1),
  torch SDPA beside the attention ops.

Greedy tokens of every baseline are compared with ours (same tokens or the first divergence).
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

SINGLE_PROMPT = 11  # seed 004's single request: 11 input tokens
LONG_PROMPT = 252  # seed 004's long-context prompt
LONG_CONTEXTS = (4096, 32768)


@dataclass(frozen=True)
class Plan:
    """What one run measures. The default is seed 004's; :data:`QUICK` is a smoke run."""

    batch: int = 10
    max_tokens: tuple[int, ...] = (32, 64, 128)
    single_tokens: int = 128
    long_contexts: tuple[int, ...] = LONG_CONTEXTS
    long_decode: int = 32
    op_rounds: int = 20
    rounds: int = 1
    quick: bool = False


QUICK = Plan(max_tokens=(4, 8, 16), single_tokens=16, long_contexts=(), long_decode=8, op_rounds=3, quick=True)

# (table, metric) -> True when higher is better. Ratios are ours over the baseline for
# higher-is-better metrics and the baseline over ours otherwise, so > 1 always means ours wins.
HEADLINE = {
    ("throughput", "output_tok_s"): True,
    ("single", "output_tok_s"): True,
    ("long", "prefill_tok_s"): True,
    ("long", "decode_ms_per_token"): False,
    ("memory", "weight_bytes"): False,
    ("memory", "load_s"): False,
    ("ops", "ms"): False,
}
UNTRACKED = {("memory", "load_s")}  # reported, but too disk-cache dependent for the gate


def prompt_ids(vocab: int, length: int, seed: int) -> list[int]:
    """A deterministic prompt of ordinary ids (clear of the first 3 and last 16 ids: specials)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab - 16, (length,), generator=g).tolist()


def batch_prompts(vocab: int, batch: int) -> list[list[int]]:
    """``batch`` prompts of 6 .. 15 tokens (different lengths: left padding is exercised)."""
    return [prompt_ids(vocab, 6 + row % 10, seed=100 + row) for row in range(batch)]


def first_divergence(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, Any]:
    """``{"compared", "identical", "first_divergence"}``; the divergence names the row, the index
    inside the row's new tokens and both tokens (rows in order, the earliest index first)."""
    compared = sum(min(len(a), len(b)) for a, b in zip(ours, theirs))
    best: dict[str, int] | None = None
    for row, (a, b) in enumerate(zip(ours, theirs)):
        index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if index is None and len(a) != len(b):
            index = min(len(a), len(b))
        if index is not None and (best is None or index < best["index"]):
            best = {"row": row, "index": index, "ours": a[index] if index < len(a) else None,
                    "baseline": b[index] if index < len(b) else None}
    return {"compared": compared, "identical": best is None and len(ours) == len(theirs),
            "first_divergence": best}


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _host_memory(device: str) -> bool:
    """True where the device's tensors live in host memory (cpu, the emulated NPU)."""
    from hal import env

    return device == "cpu" or (device == "npu" and env.npu_emulate())


def free_memory_bytes(device: str) -> int | None:
    """Free memory for a KV cache now: MemAvailable on the CPU, the allocator's free bytes on a device."""
    if _host_memory(device):
        return _mem_available()
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    if device == "npu":
        from backends.npu.runtime import torch_npu

        return int(torch_npu().npu.mem_get_info()[0])
    return None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory_bytes(device: str) -> int:
    """Peak of this process: ru_maxrss on the CPU, the allocator's peak on cuda / npu."""
    if _host_memory(device):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    if device == "npu":
        from backends.npu.runtime import torch_npu

    return int(torch_npu().npu.max_memory_allocated())


@dataclass
class Recorder:
    """Collects rows and greedy comparisons; ``step`` advances the progress bar."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    greedy: list[dict[str, Any]] = field(default_factory=list)
    step: Callable[[str], None] = lambda what: None

    def add(self, table: str, case: str, engine: str, **metrics: float) -> None:
        self.rows.append({"table": table, "case": case, "engine": engine, "metrics": metrics})

    def skip(self, table: str, case: str, engine: str, reason: str) -> None:
        self.rows.append({"table": table, "case": case, "engine": engine, "skipped": reason})


def _best(engine: Any, prompts: list[list[int]], new_tokens: int, rounds: int):
    """The fastest of ``rounds`` calls (by total seconds)."""
    runs = [engine.generate(prompts, new_tokens) for _ in range(rounds)]
    return min(runs, key=lambda g: g.seconds)


def _compare(rec: Recorder, table: str, case: str, ours: Any, engine: Any, other: Any) -> None:
    rec.greedy.append({"table": table, "case": case, "baseline": engine.name,
                       **first_divergence(ours.tokens, other.tokens)})


def _run_case(rec: Recorder, table: str, case: str, engines: list[Any], prompts: list[list[int]],
              new_tokens: int, rounds: int, metrics: Callable[[Any], dict[str, float]],
              skip: Callable[[Any], str | None] = lambda e: None) -> None:
    """Every engine on the same prompts (ours first); rows, and greedy comparisons against ours."""
    from benchmarks.engines import Unavailable

    ours = None
    for engine in engines:
        reason = skip(engine)
        if reason is None:
            try:
                run = _best(engine, prompts, new_tokens, rounds)
            except Unavailable as exc:
                reason = str(exc)
        if reason is not None:
            rec.skip(table, case, engine.name, reason)
        else:
            rec.add(table, case, engine.name, **metrics(run))
            if ours is None:
                ours = run
            else:
                _compare(rec, table, case, ours, engine, run)
        rec.step(f"{table} {case} {engine.name}")


def throughput(rec: Recorder, engines: list[Any], vocab: int, plan: Plan) -> None:
    prompts = batch_prompts(vocab, plan.batch)
    inputs = sum(len(p) for p in prompts)
    for max_tokens in plan.max_tokens:
        def metrics(run, max_tokens=max_tokens) -> dict[str, float]:
            return {"seconds": run.seconds, "input_tok_s": inputs / run.seconds,
                    "output_tok_s": plan.batch * max_tokens / run.seconds,
                    "input_tokens": inputs, "output_tokens": plan.batch * max_tokens}

        _run_case(rec, "throughput", str(max_tokens), engines, prompts, max_tokens, plan.rounds, metrics)


def single(rec: Recorder, engines: list[Any], vocab: int, plan: Plan) -> None:
    prompt = [prompt_ids(vocab, SINGLE_PROMPT, seed=7)]
    tokens = plan.single_tokens

    def metrics(run) -> dict[str, float]:
        return {"seconds": run.seconds, "output_tok_s": tokens / run.seconds,
                "first_token_ms": run.first_token_s * 1e3, "input_tokens": SINGLE_PROMPT,
                "output_tokens": tokens}

    _run_case(rec, "single", str(tokens), engines, prompt, tokens, plan.rounds, metrics)


def long_cases(max_positions: int, plan: Plan) -> list[tuple[str, int]]:
    """(case label, prompt tokens): 252 always; each context of ``plan.long_contexts`` that fits
    max_position_embeddings, with prompt = context - decode steps."""
    cases = [(str(LONG_PROMPT), LONG_PROMPT)]
    for context in plan.long_contexts:
        if context <= max_positions:
            cases.append((f"{context // 1024}k", context - plan.long_decode))
    return cases


def eager_attention_bytes(heads: int, tokens: int) -> int:
    """Eager attention's float32 score matrix for one prompt: [1, H, T, T]."""
    return heads * tokens * tokens * 4


def long_context(rec: Recorder, engines: list[Any], vocab: int, heads: int, max_positions: int,
                 device: str, plan: Plan) -> None:
    steps = plan.long_decode
    free = free_memory_bytes(device) or 0
    for case, length in long_cases(max_positions, plan):
        prompt = [prompt_ids(vocab, length, seed=length)]

        def metrics(run, length=length) -> dict[str, float]:
            return {"prompt_tokens": length, "prefill_tok_s": length / run.first_token_s,
                    "decode_ms_per_token": (run.seconds - run.first_token_s) / (steps - 1) * 1e3,
                    "decode_tokens": steps}

        def skip(engine, length=length) -> str | None:
            if getattr(engine, "attention", None) == "eager":
                need = eager_attention_bytes(heads, length)
                if need > free // 2:
                    return f"eager attention needs {need / 2**30:.1f} GiB of scores, {free / 2**30:.1f} GiB free"
            return None

        _run_case(rec, "long", case, engines, prompt, steps, plan.rounds, metrics, skip)
    for context in plan.long_contexts:
        if context > max_positions:
            for engine in engines:
                rec.skip("long", f"{context // 1024}k", engine.name,
                         f"context exceeds max_position_embeddings={max_positions}")


def memory(rec: Recorder, engines: list[Any], init_s: dict[str, float], peaks: dict[str, int],
           device: str) -> None:
    """Load / init seconds and weight bytes of every engine; KV capacity and peak of ours."""
    free = free_memory_bytes(device)
    for engine in engines:
        metrics: dict[str, float] = {"load_s": engine.load_s, "weight_bytes": engine.weight_bytes()}
        if engine.name in init_s:
            metrics["init_s"] = init_s[engine.name]
        if engine.name in peaks:
            metrics["peak_bytes"] = peaks[engine.name]
        if engine.name == "ours":
            per_token = engine.kv_bytes_per_token()
            metrics["kv_bytes_per_token"] = per_token
            if free is not None:
                metrics["free_bytes"] = free
                metrics["kv_capacity_tokens"] = free // per_token
                metrics["max_concurrency_1024"] = free // per_token // 1024
        rec.add("memory", "load", engine.name, **metrics)


# -- ops ---------------------------------------------------------------------------------------

PHASES = (("prefill", LONG_PROMPT), ("decode", 1))
"""Op timing phases: (name, new tokens T); decode reads a cache of LONG_PROMPT + 1 keys."""

# (label, op, phases it runs in, dims from the model's sizes s and the phase's T), in model order
OP_TABLE: tuple[tuple[str, str, tuple[str, ...], Callable[[dict[str, int], int], dict[str, int]]], ...] = (
    ("embedding", "embedding", ("prefill", "decode"), lambda s, t: dict(B=1, T=t, V=s["V"], E=s["E"])),
    ("rms_norm", "rms_norm", ("prefill", "decode"), lambda s, t: dict(B=1, T=t, E=s["E"])),
    ("add_rms_norm", "add_rms_norm", ("prefill", "decode"), lambda s, t: dict(B=1, T=t, E=s["E"])),
    ("linear qkv", "linear", ("prefill", "decode"),
     lambda s, t: dict(B=1, T=t, K=s["E"], O=(s["H"] + 2 * s["Hk"]) * s["D"])),
    ("rotary", "rotary", ("prefill", "decode"), lambda s, t: dict(B=1, T=t, H=s["H"], Hk=s["Hk"], D=s["D"])),
    ("kv_write", "kv_write", ("prefill", "decode"), lambda s, t: dict(B=1, T=t, C=s["C"], Hk=s["Hk"], D=s["D"])),
    ("attention_prefill", "attention_prefill", ("prefill",),
     lambda s, t: dict(B=1, T=t, H=s["H"], Hk=s["Hk"], D=s["D"])),
    ("attention_decode", "attention_decode", ("decode",),
     lambda s, t: dict(B=1, T=1, S=LONG_PROMPT + 1, C=s["C"], H=s["H"], Hk=s["Hk"], D=s["D"])),
    ("linear o", "linear", ("prefill", "decode"), lambda s, t: dict(B=1, T=t, K=s["H"] * s["D"], O=s["E"])),
    ("linear gate_up", "linear", ("prefill", "decode"), lambda s, t: dict(B=1, T=t, K=s["E"], O=2 * s["F"])),
    ("swiglu", "swiglu", ("prefill", "decode"), lambda s, t: dict(B=1, T=t, F=s["F"])),
    ("linear down", "linear", ("prefill", "decode"), lambda s, t: dict(B=1, T=t, K=s["F"], O=s["E"])),
    ("logits", "logits", ("prefill", "decode"), lambda s, t: dict(B=1, T=1, E=s["E"], V=s["V"])),
)
SDPA_OPS = ("attention_prefill", "attention_decode")


def op_labels() -> list[str]:
    """Every op timing's label (``"<phase> <name>"``), in the order :func:`op_cases` yields them."""
    return [f"{phase} {label}" for phase, _ in PHASES for label, _, phases, _ in OP_TABLE if phase in phases]


def op_cases(model) -> list[tuple[str, Any]]:
    """(label, opcheck Case) of the model's dense ops on its shapes, batch 1, the model's dtype:
    prefill T = 252, decode T = 1 against 253 cached keys (logits: the last position only)."""
    from hal.api import dtype_name
    from validation.opcheck import case

    cfg = model.config
    sizes = {"E": cfg.hidden_size, "F": cfg.intermediate_size, "V": cfg.vocab_size, "H": cfg.num_attention_heads,
             "Hk": cfg.num_key_value_heads, "D": cfg.head_dim, "C": -(-(LONG_PROMPT + 1) // 128) * 128}
    out = []
    for phase, t in PHASES:
        for label, op, phases, dims in OP_TABLE:
            if phase in phases:
                out.append((f"{phase} {label}", case(op, dtype_name(model.dtype), **dims(sizes, t))))
    return out


def op_call(model, c: Any) -> tuple[Callable[[], Any], Callable[[], Any] | None]:
    """(the bound op on the case's inputs, torch SDPA doing the same work or None), inputs on the
    model's device in its dtype."""
    from validation.opcheck import make_inputs

    args = _on_device(make_inputs(c), model.dtype, model.device)
    if c.op == "attention_decode":  # keys past kv_lens are NaN / garbage by design; SDPA reads only real ones
        args["k_cache"] = torch.nan_to_num(args["k_cache"])
        args["v_cache"] = torch.nan_to_num(args["v_cache"])
    fn = getattr(model.ops, c.op)
    return (lambda: fn(**args)), sdpa_baseline(c.op, args)


def _on_device(args: dict[str, Any], dtype: torch.dtype, dev: torch.device) -> dict[str, Any]:
    from validation.opcheck import FLOAT32_ARGS

    out = {}
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and name not in FLOAT32_ARGS:
                value = value.to(dtype)
            value = value.to(dev)
        out[name] = value
    return out


def sdpa_baseline(op: str, args: dict[str, Any]) -> Callable[[], Any] | None:
    """torch's scaled_dot_product_attention doing the op's work (GQA through ``enable_gqa``)."""
    import torch.nn.functional as F

    if op == "attention_prefill":
        q, k, v = (args[n].transpose(1, 2) for n in ("q", "k", "v"))
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=args["scale"], enable_gqa=True)
    if op == "attention_decode":
        length = int(args["kv_lens"].max())
        q = args["q"].transpose(1, 2)
        k = args["k_cache"][:, :length].transpose(1, 2)
        v = args["v_cache"][:, :length].transpose(1, 2)
        return lambda: F.scaled_dot_product_attention(q, k, v, scale=args["scale"], enable_gqa=True)
    return None


def median_ms(fn: Callable[[], Any], rounds: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up (kernel compilation)
    sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def ops(rec: Recorder, model, device: str, plan: Plan) -> None:
    """Median ms of each bound op (``model.ops``) on the model's shapes; torch SDPA beside attention."""
    from benchmarks.engines import synchronizer

    sync = synchronizer(device)
    bound = model.bound_ops
    for label, c in op_cases(model):
        if c.op not in bound:
            continue
        ours, baseline = op_call(model, c)
        rec.add("ops", label, "ours", ms=median_ms(ours, plan.op_rounds, sync), impl=bound[c.op], shape=c.label)
        if baseline is not None:
            rec.add("ops", label, "torch-sdpa", ms=median_ms(baseline, plan.op_rounds, sync))
        rec.step(f"ops {label}")


def ops_steps(model) -> int:
    return sum(1 for _, c in op_cases(model) if c.op in model.bound_ops)


def ratios(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``table/case/metric/baseline`` -> {ours, baseline, value, higher_is_better, tracked}: every
    headline metric of every baseline row beside ours in the same case."""
    measured = [r for r in rows if "metrics" in r]
    ours = {(r["table"], r["case"]): r["metrics"] for r in measured if r["engine"] == "ours"}
    out: dict[str, dict[str, Any]] = {}
    for r in measured:
        if r["engine"] == "ours" or (r["table"], r["case"]) not in ours:
            continue
        mine = ours[(r["table"], r["case"])]
        for (table, metric), higher in HEADLINE.items():
            if table != r["table"] or metric not in r["metrics"] or metric not in mine:
                continue
            a, b = float(mine[metric]), float(r["metrics"][metric])
            denominator = b if higher else a
            value = ((a if higher else b) / denominator) if denominator else None  # None: a zero measurement
            out[f"{table}/{r['case']}/{metric}/{r['engine']}"] = {
                "ours": a, "baseline": b, "value": value, "higher_is_better": higher,
                "tracked": (table, metric) not in UNTRACKED}
    return out
