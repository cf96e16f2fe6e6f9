"""Device graphs per device kind: CUDA graphs on ``cuda``, ACL graphs (``NPUGraph``) on ``npu``
(the emulated one under ``HAL_NPU_EMULATE=1``). The CPU has none: it launches no kernels, so
there is no launch overhead for a graph to remove.

Both namespaces (``torch.cuda`` and ``torch_npu.npu``) offer the same calls: a graph class,
``graph(g)`` to capture into it, ``Stream`` / ``stream`` / ``current_stream`` for the warm-up
on a side stream that capture wants first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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

    def new_graph(self) -> Any:
        return getattr(self.namespace, self.graph_class)()

    def capture(self, graph: Any) -> Any:
        """Context manager: the work inside is captured into ``graph`` (not run, on hardware)."""
        return self.namespace.graph(graph)

    def warm_up(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` once eagerly on a side stream (lazy library init happens outside capture)."""
        ns = self.namespace
        side = ns.Stream()
        side.wait_stream(ns.current_stream())
        with ns.stream(side):
            fn()
        ns.current_stream().wait_stream(side)


def emulated_runtime() -> GraphRuntime:
    """The emulator's NPUGraph (``backends/npu/emulator/graphs.py``): records aten ops and replays
    them on CPU tensors; checks capturability anywhere, measures nothing."""
    from backends.npu.emulator import device

    return GraphRuntime("torch_npu.npu.NPUGraph (EMULATED: aten ops recorded and replayed on the CPU)",
                        device, "NPUGraph", emulated=True)


def graph_runtime(kind: str) -> GraphRuntime:
    """The graph runtime of device kind ``kind``; DeviceUnavailable (one line) for ``cpu``."""
    if kind == "cuda":
        return GraphRuntime("torch.cuda.CUDAGraph", torch.cuda, "CUDAGraph")
    if kind == "npu":
        from backends.npu.runtime import emulated, torch_npu

        if emulated():
            return emulated_runtime()
        return GraphRuntime("torch_npu.npu.NPUGraph", torch_npu().npu, "NPUGraph")
    raise DeviceUnavailable(f"decode graphs need a cuda or npu device; {kind} has none "
                            "(it launches no kernels, so a graph would save nothing)")
