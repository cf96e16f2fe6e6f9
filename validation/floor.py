"""The dtype noise floor: how far *correct* implementations in the dtype under test land from the
float32 reference, measured in the same run, on the same prompts and positions as the device.

A floor never comes from the device's own output. The floor implementations are
  - ``weights``: the judge (float32 ops) with its weights rounded to the dtype: what the dtype
    costs before any arithmetic (zero for checkpoints stored in that dtype);
  - ``rounded-ops``: the judge's ops, weights rounded, every floating op output rounded to the
    dtype (float32 inside each op, one rounding at its end, as fused kernels do; logits and the
    lightning state stay float32, as the op contracts say). It shares no kernel code with any
    backend, so it is a trusted dtype implementation on every device, ``cpu`` included;
  - ``cpu-<dtype>``: our CPU torch backend in the dtype, only when the device under test is
    not ``cpu`` (an accelerator, or the emulated NPU).
The floor of a metric is its largest value over these implementations.

Every candidate (device or floor) runs the deployment protocol: the prompt is prefilled into a
KV cache, then each teacher-forced token is one decode step (:func:`run_cached`).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

import hal
from hal.api import parse_dtype
from hal.registry import BoundOps, Binding

KEEP_FLOAT32 = frozenset({"logits", "sample"})
"""Ops whose outputs stay float32 in every dtype (their contracts in hal/ops.py)."""


@dataclass
class Candidate:
    """A model judged against the reference: the device under test, or one floor implementation."""

    name: str
    description: str
    model: Any
    same_as_judge: bool = False
    """Computes exactly the judge's logits (every weight and every op of the judge's, unrounded:
    float32, or a checkpoint stored in the dtype for ``weights``), so the harness takes the
    judge's own logits instead of running the same model a second time."""


def run_cached(model: Any, ids: torch.Tensor, prompt_len: int,
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill ``ids[:, :prompt_len]`` into a KV cache, then decode the rest one token at a time.

    ids `[1, T]` (CPU) -> (logits `[T, V]` float32 on the CPU, L+1 hidden states `[1, T, E]`)."""
    cache = model.new_cache(1, ids.shape[1])
    chunks = [ids[:, :prompt_len]] + [ids[:, t:t + 1] for t in range(prompt_len, ids.shape[1])]
    steps = [_step(model, chunk, cache) for chunk in chunks]
    return _joined(steps)


def run_graph(model: Any, ids: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, list[torch.Tensor], str]:
    """:func:`run_cached` with every decode step replayed from a device graph
    (``model/decode_graph.py``: CUDA graph, NPUGraph, or the emulated NPUGraph). A replay returns
    logits only, so the hidden states cover the prompt: (logits `[T, V]`, L+1 states `[1, P, E]`,
    the graph's mode line for the report). DeviceUnavailable on cpu (no graphs there)."""
    from model.decode_graph import DecodeGraph

    cache = model.new_cache(1, ids.shape[1])
    logits, hidden = _step(model, ids[:, :prompt_len], cache)
    graph = DecodeGraph(model, cache)
    steps = [logits]
    for t in range(prompt_len, ids.shape[1]):
        steps.append(graph.step(ids[0, t:t + 1]).float().cpu().clone())
    return torch.cat(steps, dim=0), hidden, graph.mode


def _step(model: Any, chunk: torch.Tensor, cache: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = model.forward(chunk.to(model.device), cache=cache, output_hidden_states=True)
    return out.logits[0].float().cpu(), [h.cpu() for h in out.hidden_states]


def _joined(steps: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-step (logits `[t, V]`, states `[1, t, E]`) joined along the sequence."""
    logits = torch.cat([s[0] for s in steps], dim=0)
    return logits, [torch.cat([s[1][i] for s in steps], dim=1) for i in range(len(steps[0][1]))]


def teacher_force(model: Any, prompt: torch.Tensor, positions: int,
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The reference's side of :func:`run_cached`: prefill ``prompt`` `[1, P]`, then append its own
    greedy token ``positions`` times, each one decode step. Returns (ids `[1, P + positions]`,
    logits `[P + positions, V]` float32, L+1 hidden states `[1, P + positions, E]`), all on the CPU."""
    cache = model.new_cache(1, prompt.shape[1] + positions)
    ids = prompt.cpu()
    steps = [_step(model, ids, cache)]
    for _ in range(positions):
        greedy = steps[-1][0][-1].argmax().view(1, 1)
        ids = torch.cat([ids, greedy], dim=1)
        steps.append(_step(model, greedy, cache))
    logits, states = _joined(steps)
    return ids, logits, states


def _round(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype).to(value.dtype)
    return value


def _rounding(fn: Callable[..., Any], op: str, dtype: torch.dtype) -> Callable[..., Any]:
    """``fn`` with its floating outputs rounded to ``dtype`` (lightning: the output, not the state)."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        if op == "lightning_attention":
            return _round(out[0], dtype), out[1]
        if isinstance(out, tuple):
            return tuple(_round(o, dtype) for o in out)
        return _round(out, dtype)

    return wrapper


def rounded_ops(ops: BoundOps, dtype: torch.dtype) -> BoundOps:
    """The same ops, each floating output rounded to ``dtype`` (except :data:`KEEP_FLOAT32`)."""
    fns = {op: getattr(ops, op) if op in KEEP_FLOAT32 else _rounding(getattr(ops, op), op, dtype)
           for op in ops.record}
    record = {op: Binding(op, f"{b.impl}+round({str(dtype).removeprefix('torch.')})", False, ())
              for op, b in ops.record.items()}
    return BoundOps(fns, record, ops.context)


def _round_weight(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_round`, but ``value`` itself (no copy) when the rounding changes no element."""
    rounded = _round(value, dtype)
    return value if rounded is value or torch.equal(rounded, value) else rounded


def _round_table(table: Any, dtype: torch.dtype) -> Any:
    """:func:`_round_weight` of an embedding / lm_head; a quantized table (``model/table.py``) is
    rounded as its dense table (a new dense tensor), or stays itself when rounding changes nothing."""
    if isinstance(table, torch.Tensor):
        return _round_weight(table, dtype)
    dense = table.dense()
    rounded = _round_weight(dense, dtype)
    return table if rounded is dense else rounded


def weights_rounded(model: Any, dtype: torch.dtype) -> Any:
    """A shallow copy of ``model`` whose weights are rounded to ``dtype`` and kept in the model's
    dtype (the original is untouched; each rounded tensor that differs is one new copy, the others
    are the model's own)."""
    out = copy.copy(model)
    out.embed = _round_table(model.embed, dtype)
    out.final_norm = _round_weight(model.final_norm, dtype)
    out.lm_head = out.embed if model.lm_head is model.embed else _round_table(model.lm_head, dtype)
    out.layers = [dataclasses.replace(layer, **{f.name: _round_weight(getattr(layer, f.name), dtype)
                                                for f in dataclasses.fields(layer)
                                                if isinstance(getattr(layer, f.name), torch.Tensor)})
                  for layer in model.layers]
    return out


def shares_weights(model: Any, judge: Any) -> bool:
    """True when every weight tensor of ``model`` is the judge's own (as :func:`weights_rounded`
    leaves them when rounding changes nothing; quantized linears are never rounded)."""
    pairs = [(model.embed, judge.embed), (model.final_norm, judge.final_norm), (model.lm_head, judge.lm_head)]
    pairs += [(getattr(mine, f.name), getattr(theirs, f.name)) for mine, theirs in zip(model.layers, judge.layers)
              for f in dataclasses.fields(mine)]
    return len(model.layers) == len(judge.layers) and all(a is b for a, b in pairs)


def with_ops(model: Any, ops: BoundOps) -> Any:
    out = copy.copy(model)
    out.ops = ops
    return out


def build(judge: Any, path: Any, device_kind: str, dtype: str, allow_fallback: bool = False,
          progress: Callable[[str], None] = lambda _: None, quantize: str | None = None) -> list[Candidate]:
    """The floor implementations for ``dtype`` (module docstring). ``judge``: our float32 CPU
    model (reference or torch ops) whose ops and weights the first two floors derive from;
    ``path``: the checkpoint, loaded again for the CPU floor."""
    started = time.perf_counter()
    torch_dtype = parse_dtype(dtype)
    rounded = weights_rounded(judge, torch_dtype)
    ops_name = "/".join(sorted({b.impl for b in judge.ops.record.values()}))
    unrounded = shares_weights(rounded, judge)
    floors = [
        Candidate("weights", f"{ops_name} float32 ops, weights rounded to {dtype}", rounded, same_as_judge=unrounded),
        Candidate("rounded-ops", f"{ops_name} ops, weights and every op output rounded to {dtype}",
                  with_ops(rounded, rounded_ops(judge.ops, torch_dtype)),
                  same_as_judge=unrounded and torch_dtype == judge.dtype == torch.float32),
    ]
    if device_kind != "cpu":
        progress(f"loading the CPU {dtype} floor implementation")
        floors.append(Candidate(f"cpu-{dtype}", f"minicpm-hal CPU torch backend, {dtype}",
                                hal.load_model(path, "cpu", dtype, allow_fallback=allow_fallback,
                                               quantize=quantize)))
    progress(f"floor implementations ready in {time.perf_counter() - started:.1f} s: "
             + ", ".join(f.name + (" (= the judge: its logits are reused)" if f.same_as_judge else "")
                         for f in floors))
    return floors
