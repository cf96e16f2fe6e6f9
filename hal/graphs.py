"""Device graphs per device kind: CUDA graphs on ``cuda``, ACL graphs (``NPUGraph``) on ``npu``
(the emulated one under ``HAL_NPU_EMULATE=1``). The CPU has none: it launches no kernels, so
there is no launch overhead for a graph to remove.

Both namespaces (``torch.cuda`` and ``torch_npu.npu``) offer the same calls: a graph class,
``graph(g)`` to capture into it, ``Stream`` / ``stream`` / ``current_stream`` for the warm-up
on a side stream that capture wants first.

NPU graphs are captured with ``auto_dispatch_capture=True`` (torch_npu 2.13/2.14): every
``npu_fused_infer_attention_score`` (FIA) captured keeps its host arguments, and
:meth:`GraphRuntime.refresh` gives them each step's kv lengths (``NPUGraph.update``) before the
replay. An implementation that takes such host lengths (``Impl.graph_update``) reads them, while
capturing, from :func:`host_kv_lens` instead of the device tensor (a host read a capture refuses).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from hal.errors import DeviceUnavailable


@dataclass(frozen=True)
class GraphRuntime:
    """name: what captures (``torch.cuda.CUDAGraph``, ``torch_npu.npu.NPUGraph``, or the
    emulated one, which says so). namespace: ``torch.cuda`` / ``torch_npu.npu``."""

    name: str
    namespace: Any
    graph_class: str
    emulated: bool = False
    updatable: bool = False
    """NPUGraph captured with auto_dispatch_capture: :meth:`refresh` updates FIA's host lengths."""

    def new_graph(self) -> Any:
        return getattr(self.namespace, self.graph_class)()

    def capture(self, graph: Any) -> Any:
        """Context manager: the work inside is captured into ``graph`` (not run, on hardware)."""
        if self.updatable:
            return self.namespace.graph(graph, auto_dispatch_capture=True)
        return self.namespace.graph(graph)

    @property
    def mode(self) -> str:
        """How captured attention learns each step's lengths (for reports)."""
        if self.updatable:
            return "auto_dispatch_capture=True, FIA kv lengths refreshed by NPUGraph.update before each replay"
        return "plain capture (no host-argument update)"

    def refresh(self, graph: Any, kv_lens: list[int]) -> None:
        """Before a replay: give the graph's captured FIA calls this step's per-row kv lengths
        (no-op on a runtime without updates)."""
        if self.updatable:
            from backends.npu.attention import graph_update

            graph.update(cpu_update_input=graph_update(kv_lens))

    def warm_up(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` once eagerly on a side stream (lazy library init happens outside capture)."""
        ns = self.namespace
        side = ns.Stream()
        side.wait_stream(ns.current_stream())
        with ns.stream(side):
            fn()
        ns.current_stream().wait_stream(side)


_HOST_KV_LENS: list[list[int]] = []


@contextlib.contextmanager
def host_kv_lens(lengths: list[int]) -> Iterator[None]:
    """While warming up and capturing a graph: the host's per-row kv lengths of the step being
    captured, read by ``graph_update`` implementations through :func:`captured_kv_lens`."""
    _HOST_KV_LENS.append([int(n) for n in lengths])
    try:
        yield
    finally:
        _HOST_KV_LENS.pop()


def captured_kv_lens() -> list[int] | None:
    """The lengths :func:`host_kv_lens` provides, or None outside it (then read the tensor)."""
    return _HOST_KV_LENS[-1] if _HOST_KV_LENS else None


def emulated_runtime() -> GraphRuntime:
    """The emulator's NPUGraph (``backends/npu/emulator/graphs.py``): records aten ops and
    torch_npu ops and replays them on CPU tensors; checks capturability anywhere, measures nothing."""
    from backends.npu.emulator import device

    return GraphRuntime("torch_npu.npu.NPUGraph (EMULATED: ops recorded and replayed on the CPU)",
                        device, "NPUGraph", emulated=True, updatable=True)


def graph_runtime(kind: str) -> GraphRuntime:
    """The graph runtime of device kind ``kind``; DeviceUnavailable (one line) for ``cpu``."""
    if kind == "cuda":
        return GraphRuntime("torch.cuda.CUDAGraph", torch.cuda, "CUDAGraph")
    if kind == "npu":
        from backends.npu.runtime import emulated, torch_npu

        if emulated():
            return emulated_runtime()
        return GraphRuntime("torch_npu.npu.NPUGraph", torch_npu().npu, "NPUGraph", updatable=True)
    raise DeviceUnavailable(f"decode graphs need a cuda or npu device; {kind} has none "
                            "(it launches no kernels, so a graph would save nothing)")
