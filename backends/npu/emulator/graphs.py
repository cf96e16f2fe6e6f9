"""Emulated ``torch_npu.npu.NPUGraph`` (ACL graph capture): records the aten ops a capture runs
and replays exactly those ops on exactly those tensors.

What a real NPU/CUDA graph does, and what this stand-in keeps:

* Replay launches the captured kernels on the captured memory. Python does not run again, so
  any value Python read or computed during capture (a length, a position, a branch taken) is
  frozen. Here: replay re-executes the recorded ``(op, args)`` list with the same tensor
  objects; ops that return fresh tensors copy their result into the tensor captured then (its
  "graph memory"), so later ops and the caller read it there, as on hardware.
* Inputs change only through in-place writes (``copy_``) into the tensors used at capture.
* Reading a tensor's value on the host while capturing (``.item()``, ``int()``, ``bool()``,
  ``.tolist()``, ``.numpy()``) is not permitted on a capturing stream; here it raises
  :class:`GraphCaptureError` naming the call. So do ops whose output shape depends on data
  (``nonzero``, boolean-mask indexing, ...), which need such a read.

Not emulated: memory pools and sharing them between graphs, streams (the CPU has one),
``graph_task_update`` (refreshing host arguments of captured ops).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from backends.npu.emulator.checks import EmulatedOpError

aten = torch.ops.aten

_DATA_DEPENDENT_SHAPES = {
    aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
    aten._unique2.default, aten.unique_dim.default, aten.repeat_interleave.Tensor,
}
_HOST_READ_METHODS = ("tolist", "numpy", "__array__")


class GraphCaptureError(EmulatedOpError):
    """Something a real graph capture rejects (a host read, a data-dependent shape)."""


def _capture_error(what: str) -> GraphCaptureError:
    return GraphCaptureError(f"NPUGraph capture (emulated): {what} is not permitted while capturing "
                             "(it needs the tensor's value on the host)")


def _is_tensor_type(t: torch._C.JitType) -> bool:
    if isinstance(t, (torch._C.ListType, torch._C.OptionalType)):
        return _is_tensor_type(t.getElementType())
    return isinstance(t, torch._C.TensorType)


def _returns_host_value(func: torch._ops.OpOverload) -> bool:
    return not all(_is_tensor_type(r.type) for r in func._schema.returns)


def _has_bool_index(args: tuple) -> bool:
    flat, _ = tree_flatten(args)
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in flat[1:])


def _is_pure_view(func: torch._ops.OpOverload, args: tuple, out: Any) -> bool:
    """A view op whose outputs all alias an input (``.to()`` / ``contiguous`` are marked as views
    but copy when they must): replay can skip it, the captured view sees the captured base."""
    if not func.is_view:
        return False
    inputs = {t.untyped_storage().data_ptr() for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)}
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return all(t.untyped_storage().data_ptr() in inputs for t in outs)


class _Recorder(TorchDispatchMode):
    """Runs every op (capture executes eagerly here) and records it with its outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[torch._ops.OpOverload, tuple, dict, Any, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DATA_DEPENDENT_SHAPES:
            raise _capture_error(f"{func} (its output shape depends on tensor values)")
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and _has_bool_index(args):
            raise _capture_error(f"boolean-mask indexing ({func})")
        if _returns_host_value(func):
            raise _capture_error(f"{func} (returns a host value)")
        out = func(*args, **kwargs)
        self.steps.append((func, args, kwargs, out, _is_pure_view(func, args, out)))
        return out


@contextlib.contextmanager
def _no_host_reads() -> Iterator[None]:
    saved = {name: getattr(torch.Tensor, name) for name in _HOST_READ_METHODS}

    def refuse(name: str) -> Callable[..., Any]:
        def method(self, *args, **kwargs):
            raise _capture_error(f"Tensor.{name}()")
        return method

    try:
        for name in _HOST_READ_METHODS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _replay_step(func: torch._ops.OpOverload, args: tuple, kwargs: dict, captured: Any, view: bool) -> None:
    if view:
        return  # the captured view already aliases the captured base
    result = func(*args, **kwargs)
    new, _ = tree_flatten(result)
    old, _ = tree_flatten(captured)
    for before, now in zip(old, new):
        if not isinstance(before, torch.Tensor) or now.data_ptr() == before.data_ptr():
            continue  # in-place / out= ops (and no-op .to()) wrote into the captured tensor itself
        if before.shape != now.shape:
            raise GraphCaptureError(f"NPUGraph replay (emulated): {func} produced shape "
                                    f"{list(now.shape)}, captured {list(before.shape)}")
        before.copy_(now)


class NPUGraph:
    """``torch_npu.npu.NPUGraph``: ``capture_begin()`` / ``capture_end()`` (or ``with graph(g):``),
    then ``replay()`` any number of times; ``reset()`` drops the recording."""

    def __init__(self) -> None:
        self._steps: list | None = None
        self._recorder: _Recorder | None = None
        self._guard: contextlib.ExitStack | None = None

    def capture_begin(self, pool: object = None, capture_error_mode: str = "global") -> None:
        if self._recorder is not None or self._steps is not None:
            raise GraphCaptureError("NPUGraph (emulated): capture_begin on a graph that is capturing or "
                                    "already captured; call reset() first")
        self._recorder = _Recorder()
        self._guard = contextlib.ExitStack()
        self._guard.enter_context(_no_host_reads())
        self._guard.enter_context(self._recorder)

    def capture_end(self) -> None:
        if self._recorder is None or self._guard is None:
            raise GraphCaptureError("NPUGraph (emulated): capture_end without capture_begin")
        self._guard.close()
        self._steps, self._recorder, self._guard = self._recorder.steps, None, None

    def _abort(self) -> None:
        if self._guard is not None:
            self._guard.close()
        self._recorder = self._guard = None

    def replay(self) -> None:
        if self._steps is None:
            raise GraphCaptureError("NPUGraph (emulated): replay before a finished capture")
        with torch.inference_mode():
            for step in self._steps:
                _replay_step(*step)

    def reset(self) -> None:
        self._abort()
        self._steps = None

    @property
    def op_count(self) -> int:
        """How many aten ops the capture recorded (emulator only: the launches a replay saves)."""
        return len(self._steps or ())


class graph:  # noqa: N801 - the torch_npu name
    """``with torch_npu.npu.graph(g):`` captures the block into ``g``; an exception aborts it."""

    def __init__(self, npu_graph: NPUGraph, pool: object = None, stream: object = None,
                 capture_error_mode: str = "global") -> None:
        self.npu_graph = npu_graph
        self.pool = pool

    def __enter__(self) -> NPUGraph:
        self.npu_graph.capture_begin(self.pool)
        return self.npu_graph

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.npu_graph._abort()
            return
        self.npu_graph.capture_end()
