"""Is an implementation really capturable? Run it captured in a device graph (the device's
real CUDA graph / NPUGraph, or the emulated ``NPUGraph`` of ``backends/npu/emulator/graphs.py``
on the CPU), then replay it on *other* inputs and judge the replay.

A graph replays the kernels launched at capture on the captured buffers, so an implementation
that read a tensor value on the host while capturing (a length, a slot) would replay with the
capture's value. Capture here happens on inputs that differ from the judged ones in every
tensor, integers included (token ids, kv_lens, slots, block selections); the judged inputs are then written into
the captured tensors with ``copy_`` (what a decode graph does), the graph replays, and
:func:`validation.opcheck.check` compares the replay's outputs with the float32 reference on the
judged inputs. A host read during capture fails the case with the graph's error.

An implementation whose host length arguments the graph refreshes (``Impl.graph_update``: FIA
decode) is captured with the capture inputs' lengths (``hal.graphs.host_kv_lens``) and refreshed
with the judged ones before the replay (``GraphRuntime.refresh``), as a decode graph does. The
emulated NPUGraph also names the plain torch (non-torch_npu) ops the capture recorded: the
result's ``extra["plain_ops"]``, reported as "capture unverified on hardware".
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from hal.graphs import GraphRuntime, emulated_runtime, host_kv_lens
from hal.ops import get_spec
from hal.registry import Impl
from validation.opcheck import Case, CaseResult, check


def _capture_values(name: str, value: torch.Tensor, c: Case) -> torch.Tensor:
    """Different inputs of the same shape and dtype for the capture run."""
    if value.is_floating_point():
        return (value * -0.5 + 0.25).to(value.dtype)
    if name == "ids":
        return (value + 1) % c.dim("V")
    if name == "kv_lens":
        return (value - 1).clamp(min=1)
    if name == "slots":
        return torch.where(value >= 0, (value + 1) % c.dim("C"), value)
    if name == "blocks":
        return torch.full_like(value, -1)  # no block selected: every query sees nothing
    return value


def _lengths(args: dict[str, Any]) -> list[int]:
    return [int(n) for n in args["kv_lens"].tolist()]


def captured(fn: Callable[..., Any], c: Case, runtime: GraphRuntime | None = None, graph_update: bool = False,
             plain_ops: set[str] | None = None) -> Callable[..., Any]:
    """``fn`` behind a graph of ``runtime`` (default: the emulated NPUGraph): a call captures
    ``fn`` on other inputs of the same shapes, copies this call's inputs into the captured ones,
    replays, and returns the captured outputs (an in-place op's outputs are copied back into
    this call's arguments). graph_update: capture with the capture inputs' host kv lengths and
    refresh the graph with this call's before the replay. plain_ops: receives the plain torch
    ops the (emulated) graph recorded."""
    inplace = get_spec(c.op).inplace
    runtime = runtime or emulated_runtime()

    def run(**args: Any) -> Any:
        static = {k: _capture_values(k, v, c) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        g = runtime.new_graph()
        hosts = host_kv_lens(_lengths(static)) if graph_update else contextlib.nullcontext()
        with torch.inference_mode():
            with hosts:
                runtime.warm_up(lambda: fn(**static))
                with runtime.capture(g):
                    out = fn(**static)
            for k, v in args.items():
                if isinstance(v, torch.Tensor):
                    static[k].copy_(v)
            if graph_update:
                runtime.refresh(g, _lengths(args))
            g.replay()
        if plain_ops is not None:
            plain_ops.update(getattr(g, "plain_ops", ()))
        if inplace:
            for name in get_spec(c.op).outputs:
                args[name].copy_(static[name])
        return out

    return run


def check_captured(c: Case, impl: Impl, device: str | None = None,
                   runtime: GraphRuntime | None = None) -> CaseResult:
    """:func:`check` of ``impl`` run through :func:`captured` (status ``not supported`` as
    ``check_impl`` when its ``supports()`` refuses the case)."""
    device = device or impl.backend
    reason = impl.supports(c.context(device))
    if reason is not None:
        return CaseResult(c, impl.qualname, "not supported", reason=reason)
    label = f"{impl.qualname} (captured{', emulated graph' if runtime is None or runtime.emulated else ''})"
    if impl.graph_update and runtime is not None and not runtime.updatable:
        return CaseResult(c, label, "not supported", reason="needs a graph runtime that refreshes host lengths")
    plain: set[str] = set()
    result = check(c, captured(impl.load(), c, runtime, impl.graph_update, plain), label, device,
                   prepare=impl.load_prepare())
    result.extra["plain_ops"] = sorted(plain)
    return result
