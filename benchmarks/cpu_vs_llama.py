"""Issue 13's CPU table: our decode and prefill against llama.cpp on the same GGUF weights, per
format, with the weight bytes and RSS of each, all from one run (``python -m benchmarks.cpu_speed``).

Formats (the files: ``benchmarks/gguf_variants.py``, built from the source GGUF on first use):

* ``float32``: ours in float32 on the F32 GGUF, against llama.cpp on that file; ours also
  through the eager ``model.forward`` (the path before ``model/fast_decode.py``) and with the
  decoder linears on ``cpu.torch_kn`` (MKL on pre-transposed `[K, O]` weights) and the logits on
  ``cpu.torch`` (``F.linear``): the paths before ``cpu.onednn`` (:data:`OPT_OUTS`), for the
  before/after of the same run (the opt-out also in the memory table);
* ``bfloat16``: ours in bfloat16 on the F32 GGUF (rounded at load), against llama.cpp F32; ours
  also with the lm_head through the chunked float32 path (the path before ``cpu.fbgemm``'s packed
  float16 copy, ``backends/cpu/logits_fp16.py``), the same for ``int4``;
* ``int4``: ours with the Q4_0 GGUF kept quantized (``hal.load_model(..., quantize="keep")``,
  bfloat16 activations, the dtype torch's CPU int4 kernel serves) against llama.cpp on that file.
  Runs only where the quantized loading exists (:func:`int4_unavailable` says why not).

``float32`` and ``int4`` also get a row decoded by the same model with its decoder layers compiled
by AOTInductor (``DecodeStep(compiled=True)``, ``model/compiled_decode.py``; opt-in, so the plain
"ours" row stays the default path); its package is built in the warm-up round when not cached.
``int4`` also gets :data:`CODES_LOGITS`: that compiled step on the model loaded without the packed
float16 lm_head, the logits from the Q8_0 table's codes (the low-memory configuration).

Per engine and format: prefill tok/s = prompt tokens / time of one forward over the prompt
(last-position logits, greedy token); decode tok/s = new tokens / time of that many single-token
steps (greedy argmax in between, logits of every step computed in full). Rounds alternate the
engines' order; the best round is reported (the median beside it). Memory: in a fresh process
per engine and format, the weight bytes the engine holds and the RSS growth over the imports
after loading and an 8-token forward (llama.cpp maps the file: its pages count once touched).
"""
from __future__ import annotations

import inspect
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

LLAMA_FILE = {"float32": "F32", "bfloat16": "F32", "int4": "Q4_0"}
OUR_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "int4": "bfloat16"}
FORMATS = tuple(LLAMA_FILE)
COMPILED = ("float32", "int4")
COMPILED_ROW = "ours, compiled decoder layers (opt-in: DecodeStep(compiled=True))"
"""The formats that also get a row decoded by the AOTInductor-compiled layers (model/compiled_decode.py)."""
OPT_OUTS = {"float32": ("ours, linear -> cpu.torch_kn, logits -> cpu.torch (before)",
                        {"linear": "cpu.torch_kn", "logits": "cpu.torch"})}
"""Per format: (engine name, ``prefer=``) of the before-row loaded with an implementation opted out."""
CODES_LOGITS = ("ours, compiled, logits from the table's codes (prefer logits -> cpu.torch)", {"logits": "cpu.torch"})
"""int4: the compiled step of the model loaded without cpu.fbgemm's packed float16 lm_head (its Q8_0
token table held only as codes, ``compiled.codes_logits``): the low-memory row, also in the memory table."""
PREFER_OF_ENGINE = {engine: prefer for engine, prefer in (*OPT_OUTS.values(), CODES_LOGITS)}
"""Engine name -> its ``prefer=`` (the memory table's children load each row's model by its name)."""


def int4_unavailable() -> str | None:
    """None when ours can keep a Q4_0 GGUF quantized (``hal.quant`` and ``load_model(quantize=)``
    exist), else why not."""
    try:
        import hal.quant  # noqa: F401
    except ImportError:
        return "not available: quantized loading (hal.quant) is not in this checkout"
    import hal

    if "quantize" not in inspect.signature(hal.load_model).parameters:
        return "not available: hal.load_model takes no quantize= in this checkout"
    return None


def gguf_file(source: Path, fmt: str) -> Path:
    from benchmarks.gguf_variants import f32_gguf, q4_0_gguf

    return q4_0_gguf(source) if LLAMA_FILE[fmt] == "Q4_0" else f32_gguf(source)


def load_ours(path: Path, fmt: str, prefer: dict[str, str] | None = None):
    import hal

    kwargs = {"quantize": "keep"} if fmt == "int4" else {}
    model = hal.load_model(path, device="cpu", dtype=OUR_DTYPE[fmt], prefer=prefer, **kwargs)
    if fmt == "int4" and not quantized_linears(model):
        from hal.errors import CheckpointError

        raise CheckpointError(f"{path}: loaded with quantize='keep' but no decoder linear stayed quantized")
    return model


def quantized_linears(model) -> int:
    """How many decoder linears ``model`` holds quantized (not as dense tensors)."""
    return sum(1 for layer in model.layers for v in vars(layer).values()
               if v is not None and not isinstance(v, (str, torch.Tensor)))


def without_prepared_head(model):
    """A shallow copy of ``model`` whose logits op receives the dense lm_head (``cpu.fbgemm`` then
    runs the chunked float32 path, ``logits_cpu``; a quantized table: its codes, decoded chunk by
    chunk by the same path): the before of the same weights and binding."""
    import copy

    from model.minicpm import PreparedHead
    from model.table import PreparedTable

    plain = copy.copy(model)
    plain.head = None
    if isinstance(model.lm_head, PreparedTable):  # a quantized table: the chunked decoding of its codes
        from backends.cpu.table import CodesTable

        codes = CodesTable(model.lm_head.container, model.dtype)
        plain.head = PreparedHead(model.head.impl, model.lm_head, codes, codes.layout, 0)
    return plain


def our_weight_bytes(model) -> int:
    """Bytes of the weights ``model`` holds: distinct tensor storages (tied and fused views once)
    plus the prepared bytes of each quantized linear and of a prepared lm_head (``cpu.fbgemm``'s
    packed float16 copy, held beside the dense tensor)."""
    seen: set[int] = set()
    total = model.head.prepared_bytes if model.head is not None else 0
    items = [model.embed, model.lm_head, model.final_norm]
    items += [v for layer in model.layers for v in vars(layer).values() if v is not None and not isinstance(v, str)]
    for item in items:
        if isinstance(item, torch.Tensor):
            pointer = item.untyped_storage().data_ptr()
            if pointer not in seen:
                seen.add(pointer)
                total += item.untyped_storage().nbytes()
        elif id(item) not in seen:  # a prepared quantized linear or embedding table (tied: once)
            seen.add(id(item))
            total += int(getattr(item, "prepared_bytes"))
    return total


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of the tensors in a GGUF file (what llama.cpp holds as weights)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


# -- runners: prefill(ids) -> first token; decode(token, steps) -> tokens ----------------------

class OursRunner:
    """Ours: prefill through ``model.forward`` into a fresh cache; decode through the fast CPU step
    (``model/fast_decode.py``, what ``generate`` runs) or, ``eager``, through ``model.forward``."""

    def __init__(self, name: str, model, eager: bool = False, compiled: bool = False):
        self.name = name
        self.model = model
        self.eager = eager
        self.compiled = compiled
        self.cache = None

    def prefill(self, ids: list[int], capacity: int) -> int:
        self.cache = self.model.new_cache(1, capacity)
        with torch.inference_mode():
            out = self.model.forward(torch.tensor([ids]), cache=self.cache, logits_last_only=True)
        return int(out.logits[0, -1].argmax())

    def decode(self, token: int, steps: int) -> list[int]:
        from model.fast_decode import DecodeStep

        tokens = []
        current = torch.tensor([token])
        step = None if self.eager else DecodeStep(self.model, self.cache, compiled=self.compiled)
        with torch.inference_mode():
            for _ in range(steps):
                if step is None:
                    logits = self.model.forward(current[:, None], cache=self.cache, logits_last_only=True).logits[:, -1]
                else:
                    logits = step.step(current)
                current = logits.argmax(-1)
                tokens.append(int(current[0]))
        return tokens


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's low-level calls: the prompt in one ``eval``, then one
    ``eval`` per token, greedy argmax over the last position's logits (as ours)."""

    def __init__(self, name: str, path: Path, threads: int, context: int):
        from benchmarks.engines import LlamaCppEngine

        self.name = name
        self.engine = LlamaCppEngine(path, "cpu", context, threads)

    def _argmax(self) -> int:
        import llama_cpp
        import numpy as np

        llm = self.engine.llm
        logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).argmax())

    def prefill(self, ids: list[int], capacity: int) -> int:
        self.engine.llm.reset()
        self.engine.llm.eval(ids)
        return self._argmax()

    def decode(self, token: int, steps: int) -> list[int]:
        tokens = []
        for _ in range(steps):
            self.engine.llm.eval([token])
            token = self._argmax()
            tokens.append(token)
        return tokens


@dataclass
class Timing:
    """Seconds per timed round of one runner, and its greedy tokens (prefill's first)."""

    name: str
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def tok_s(self, phase: str, tokens: int, how=min) -> float:
        return tokens / how(self.prefill_s if phase == "prefill" else self.decode_s)


def measure(runners: list[Any], ids: list[int], new_tokens: int, rounds: int, warmup: int = 1) -> dict[str, Timing]:
    """Alternating order round by round (load from other processes hits all alike)."""
    timings = {r.name: Timing(r.name) for r in runners}
    capacity = len(ids) + new_tokens + 1
    for index in range(warmup + rounds):
        for runner in (runners if index % 2 == 0 else runners[::-1]):
            start = time.perf_counter()
            first = runner.prefill(ids, capacity)
            middle = time.perf_counter()
            rest = runner.decode(first, new_tokens)
            end = time.perf_counter()
            timing = timings[runner.name]
            timing.tokens = [first] + rest
            if index >= warmup:
                timing.prefill_s.append(middle - start)
                timing.decode_s.append(end - middle)
    return timings


# -- memory (fresh process per engine and format) ----------------------------------------------

def _status(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its high-water mark, this process only: unlike
    ``ru_maxrss`` it does not start from the parent's) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def memory_child(engine: str, path: str, fmt: str, threads: int) -> None:
    """Runs in a fresh interpreter: prints JSON {weight_bytes, rss_growth, peak_growth}."""
    import hal  # noqa: F401  (the imports are the baseline)
    import model.minicpm  # noqa: F401

    if engine == "llama.cpp":
        import llama_cpp  # noqa: F401
    torch.set_num_threads(threads)
    baseline, baseline_peak = _status("VmRSS"), _status("VmHWM")
    ids = list(range(10, 18))
    if engine == "llama.cpp":
        runner = LlamaCppRunner("llama.cpp", Path(path), threads, 64)
        runner.prefill(ids, 16)
        weight_bytes = gguf_tensor_bytes(Path(path))
    else:
        loaded = load_ours(Path(path), fmt, PREFER_OF_ENGINE.get(engine))
        OursRunner("ours", loaded).prefill(ids, 16)
        weight_bytes = our_weight_bytes(loaded)
    peak = _status("VmHWM")
    print(json.dumps({"weight_bytes": weight_bytes, "rss_growth": _status("VmRSS") - baseline,
                      "peak_growth": peak - baseline_peak}))


def measure_memory(engine: str, path: Path, fmt: str, threads: int) -> dict[str, int]:
    command = [sys.executable, "-m", "benchmarks.cpu_speed", "--memory-child", engine, str(path), fmt, str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"[:160]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the tables --------------------------------------------------------------------------------

@dataclass
class Row:
    fmt: str
    engine: str
    file: str
    timing: Timing | None = None
    note: str = ""


def run_tables(source: Path, formats: list[str], prompt_tokens: int, new_tokens: int, rounds: int,
               threads: int, llama_cpp: bool, memory: bool, warmup: int = 1) -> list[str]:
    """Markdown lines: the speed table, then the memory table."""
    from benchmarks.cpu_speed import prompt_ids

    speed: list[Row] = []
    mem_rows: list[tuple[str, str, Path]] = []
    groups = [["float32", "bfloat16"], ["int4"]]
    for group in groups:
        wanted = [f for f in group if f in formats]
        if not wanted:
            continue
        unavailable = int4_unavailable() if "int4" in wanted else None
        if unavailable is not None:
            speed.append(Row("int4", "ours", "Q4_0", note=unavailable))
            speed.append(Row("int4", "llama.cpp", "Q4_0", note="not run (ours has no int4 to compare)"))
            continue
        if "int4" in wanted and not llama_cpp:
            speed.append(Row("int4", "ours", "Q4_0", note="not run: the Q4_0 file is quantized by llama.cpp "
                                                          "(--no-llama-cpp)"))
            continue
        runners, rows = [], []
        for fmt in wanted:
            path = gguf_file(source, fmt)
            model = load_ours(path, fmt)
            runners.append(OursRunner(f"ours {fmt}", model))
            rows.append(Row(fmt, "ours", path.name))
            mem_rows.append((fmt, "ours", path))
            if fmt in COMPILED:
                runners.append(OursRunner(f"ours {fmt} compiled", model, compiled=True))
                rows.append(Row(fmt, COMPILED_ROW, path.name))
            if fmt == "float32":
                runners.append(OursRunner("ours float32 eager", model, eager=True))
                rows.append(Row(fmt, "ours, eager forward (before)", path.name))
            if fmt in OPT_OUTS:
                engine, prefer = OPT_OUTS[fmt]
                opted_out = load_ours(path, fmt, prefer)
                runners.append(OursRunner(engine, opted_out))
                rows.append(Row(fmt, engine, path.name))
                mem_rows.append((fmt, engine, path))
                if fmt in COMPILED:
                    compiled_engine = engine.replace("ours,", "ours, compiled decoder layers,", 1)
                    runners.append(OursRunner(compiled_engine, opted_out, compiled=True))
                    rows.append(Row(fmt, compiled_engine, path.name))
            elif model.head is not None:
                runners.append(OursRunner(f"ours {fmt} chunked head", without_prepared_head(model)))
                rows.append(Row(fmt, "ours, chunked float32 lm_head (before)", path.name))
            if fmt == "int4":
                engine, prefer = CODES_LOGITS
                runners.append(OursRunner(engine, load_ours(path, fmt, prefer), compiled=True))
                rows.append(Row(fmt, engine, path.name))
                mem_rows.append((fmt, engine, path))
        llama_path = gguf_file(source, wanted[0])
        if llama_cpp:
            from benchmarks.engines import Unavailable

            try:
                runners.append(LlamaCppRunner(f"llama.cpp {LLAMA_FILE[wanted[0]]}", llama_path, threads,
                                              prompt_tokens + new_tokens + 8))
                rows.append(Row(wanted[0], "llama.cpp", llama_path.name))
                mem_rows.append((LLAMA_FILE[wanted[0]], "llama.cpp", llama_path))
            except Unavailable as exc:
                rows.append(Row(wanted[0], "llama.cpp", llama_path.name, note=f"not run: {exc}"))
        else:
            rows.append(Row(wanted[0], "llama.cpp", llama_path.name, note="not run (--no-llama-cpp)"))
        vocab = runners[0].model.config.vocab_size
        ids = prompt_ids(vocab, prompt_tokens)[0].tolist()
        timings = measure(runners, ids, new_tokens, rounds, warmup)
        for row, runner in zip([r for r in rows if not r.note], runners):
            row.timing = timings[runner.name]
        speed += rows
        del runners
    lines = _speed_lines(speed, prompt_tokens, new_tokens)
    if memory:
        lines += [""] + _memory_lines(mem_rows, threads)
    return lines


def _speed_lines(rows: list[Row], prompt_tokens: int, new_tokens: int) -> list[str]:
    lines = ["| format | engine | file | prefill tok/s | decode tok/s (median) | decode / llama.cpp "
             "| prefill / llama.cpp | greedy tokens = llama.cpp's |", "|---|---|---|---|---|---|---|---|"]
    llama = {}
    for row in rows:
        if row.engine == "llama.cpp" and row.timing is not None:
            llama[LLAMA_FILE[row.fmt]] = row.timing
    for row in rows:
        if row.timing is None:
            lines.append(f"| {row.fmt} | {row.engine} | {row.file} | {row.note} | | | | |")
            continue
        t = row.timing
        prefill, decode = t.tok_s("prefill", prompt_tokens), t.tok_s("decode", new_tokens)
        median = t.tok_s("decode", new_tokens, statistics.median)
        ref = llama.get(LLAMA_FILE[row.fmt])
        if ref is None or row.engine == "llama.cpp":
            ratios = ["", "", ""]
        else:
            same = sum(a == b for a, b in zip(t.tokens, ref.tokens))
            ratios = [f"{decode / ref.tok_s('decode', new_tokens):.2f}x",
                      f"{prefill / ref.tok_s('prefill', prompt_tokens):.2f}x", f"{same}/{len(t.tokens)}"]
        lines.append(f"| {row.fmt} | {row.engine} | {row.file} | {prefill:.1f} | {decode:.1f} ({median:.1f}) | "
                     + " | ".join(ratios) + " |")
    return lines


def _memory_lines(rows: list[tuple[str, str, Path]], threads: int) -> list[str]:
    mib = 1 << 20
    lines = ["| format | engine | weight bytes held | RSS growth after load + 8-token forward | peak RSS growth |",
             "|---|---|---|---|---|"]
    for fmt, engine, path in rows:
        r = measure_memory(engine, path, fmt, threads)
        if "error" in r:
            lines.append(f"| {fmt} | {engine} | {r['error']} | | |")
            continue
        lines.append(f"| {fmt} | {engine} | {r['weight_bytes'] / mib:.1f} MiB | {r['rss_growth'] / mib:.1f} MiB "
                     f"| {r['peak_growth'] / mib:.1f} MiB |")
    return lines
