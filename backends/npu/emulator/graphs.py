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
* An (emulated) torch_npu op launched while capturing is one captured aclnn task: it runs whole
  (its own checks may read its CPU tensors), and replay runs it again with the arguments it was
  captured with. Every other op recorded is a plain torch (aten) op: the NPUGraph guide says only
  aclnn ops capture, so :attr:`NPUGraph.plain_ops` lists them as "capture unverified on hardware".
* ``graph(g, auto_dispatch_capture=True)`` (torch_npu 2.13/2.14 ``npu/graphs.py``): each
  ``npu_fused_infer_attention_score`` captured is a dispatch record whose host arguments
  ``g.update(cpu_update_input=[{...}])`` replaces (one dict: every record; else one per record,
  in capture order), so the next replays read the new lengths; a replay without an update reads
  the captured ones. As on torch_npu the captured call returns ``[attention_out, softmax_lse]``
  with a shape-(1,) lse. ``update`` on a graph captured without auto dispatch raises.

Not emulated: memory pools and sharing them between graphs (``pool()`` returns a token), streams
(the CPU has one), the ``graph_task_group`` / ``graph_task_update`` calls themselves.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from backends.npu.emulator.checks import EmulatedOpError

aten = torch.ops.aten
FIA = "npu_fused_infer_attention_score"
_CAPTURING: list["NPUGraph"] = []  # the graph being captured (one capture at a time, as on hardware)
_HOST_READS_ALLOWED = [False]

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
    """Runs every op (capture executes eagerly here) and records it with its outputs; the names of
    the plain (non-view) aten ops go to ``plain``."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list = []
        self.plain: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DATA_DEPENDENT_SHAPES:
            raise _capture_error(f"{func} (its output shape depends on tensor values)")
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and _has_bool_index(args):
            raise _capture_error(f"boolean-mask indexing ({func})")
        if _returns_host_value(func):
            raise _capture_error(f"{func} (returns a host value)")
        out = func(*args, **kwargs)
        view = _is_pure_view(func, args, out)
        self.steps.append(_AtenStep(func, args, kwargs, out, view))
        if not view:
            self.plain.add(func.overloadpacket.__name__)
        return out


@contextlib.contextmanager
def _no_host_reads() -> Iterator[None]:
    saved = {name: getattr(torch.Tensor, name) for name in _HOST_READ_METHODS}

    def refuse(name: str) -> Callable[..., Any]:
        def method(self, *args, **kwargs):
            if _HOST_READS_ALLOWED[0]:  # inside an emulated torch_npu op: its own business
                return saved[name](self, *args, **kwargs)
            raise _capture_error(f"Tensor.{name}()")
        return method

    try:
        for name in _HOST_READ_METHODS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _into_captured(name: object, captured: Any, result: Any) -> None:
    """Copy a replayed op's outputs into the tensors it returned at capture (its graph memory)."""
    new, _ = tree_flatten(result)
    old, _ = tree_flatten(captured)
    for before, now in zip(old, new):
        if not isinstance(before, torch.Tensor) or now.data_ptr() == before.data_ptr():
            continue  # in-place / out= ops (and no-op .to()) wrote into the captured tensor itself
        if before.shape != now.shape:
            raise GraphCaptureError(f"NPUGraph replay (emulated): {name} produced shape "
                                    f"{list(now.shape)}, captured {list(before.shape)}")
        before.copy_(now)


class _AtenStep:
    """One plain torch op as captured."""

    def __init__(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any, view: bool) -> None:
        self.func, self.args, self.kwargs, self.out, self.view = func, args, kwargs, out, view

    def replay(self) -> None:
        if not self.view:  # a captured view already aliases the captured base
            _into_captured(self.func, self.out, self.func(*self.args, **self.kwargs))


class _NpuStep:
    """One emulated torch_npu op as captured (one aclnn task): replay calls it again on the captured
    tensors with ``kwargs``, which ``NPUGraph.update`` may have replaced (FIA under auto dispatch)."""

    def __init__(self, name: str, fn: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
        self.name, self.fn, self.args, self.kwargs, self.out = name, fn, args, dict(kwargs), out

    def replay(self) -> None:
        _into_captured(self.name, self.out, _run_whole(self.fn, self.args, self.kwargs))


def _run_whole(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Run an emulated torch_npu op outside the capture recorder and its host-read guard."""
    _HOST_READS_ALLOWED[0] = True
    try:
        with _disable_current_modes():
            return fn(*args, **kwargs)
    finally:
        _HOST_READS_ALLOWED[0] = False


def aclnn_op(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of the emulated torch_npu ops: while a graph captures, the call is one captured
    task (see the module docstring); otherwise it just runs."""
    name = fn.__name__

    @functools.wraps(fn)
    def launch(*args: Any, **kwargs: Any) -> Any:
        if not _CAPTURING:
            return fn(*args, **kwargs)
        return _CAPTURING[-1]._launch(name, fn, args, kwargs)

    return launch


class NPUGraph:
    """``torch_npu.npu.NPUGraph``: ``capture_begin()`` / ``capture_end()`` (or ``with graph(g):``),
    then ``replay()`` any number of times; ``update()`` after an ``auto_dispatch_capture``;
    ``reset()`` drops the recording; ``pool()`` returns this graph's (opaque) pool token."""

    def __init__(self) -> None:
        self._steps: list | None = None
        self._recorder: _Recorder | None = None
        self._guard: contextlib.ExitStack | None = None
        self._records: list[_NpuStep] = []  # FIA dispatch records (auto_dispatch_capture)
        self.auto_dispatch_capture = False
        self.plain_ops: tuple[str, ...] = ()

    def capture_begin(self, pool: object = None, capture_error_mode: str = "global") -> None:
        if self._recorder is not None or self._steps is not None:
            raise GraphCaptureError("NPUGraph (emulated): capture_begin on a graph that is capturing or "
                                    "already captured; call reset() first")
        if capture_error_mode not in ("global", "thread_local", "relaxed"):
            raise GraphCaptureError(f"NPUGraph (emulated): capture_error_mode must be global, thread_local "
                                    f"or relaxed, got {capture_error_mode!r}")
        if _CAPTURING:
            raise GraphCaptureError("NPUGraph (emulated): another graph is capturing (one capture at a time)")
        self._recorder = _Recorder()
        self._records = []
        self._guard = contextlib.ExitStack()
        self._guard.enter_context(_no_host_reads())
        self._guard.enter_context(self._recorder)
        _CAPTURING.append(self)

    def capture_end(self) -> None:
        if self._recorder is None or self._guard is None:
            raise GraphCaptureError("NPUGraph (emulated): capture_end without capture_begin")
        self._close()
        self._steps, self.plain_ops = self._recorder.steps, tuple(sorted(self._recorder.plain))
        self._recorder = None

    def _close(self) -> None:
        if self in _CAPTURING:
            _CAPTURING.remove(self)
        if self._guard is not None:
            self._guard.close()
        self._guard = None

    def _abort(self) -> None:
        self._close()
        self._recorder = None
        self._records = []

    def _launch(self, name: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """An emulated torch_npu op called while capturing: run it whole and record it as one task."""
        if name == FIA and self.auto_dispatch_capture:
            # torch_npu's _GraphDispatchMode: captured as the .out variant with a max workspace,
            # returning [attention_out, softmax_lse of shape (1,)]
            kwargs = dict(kwargs, softmax_lse_flag=False)
            out = list(_run_whole(fn, args, kwargs))
            step = _NpuStep(name, fn, args, kwargs, out)
            self._records.append(step)
        else:
            out = _run_whole(fn, args, kwargs)
            step = _NpuStep(name, fn, args, kwargs, out)
        self._recorder.steps.append(step)
        return out

    def replay(self) -> None:
        if self._steps is None:
            raise GraphCaptureError("NPUGraph (emulated): replay before a finished capture")
        with torch.inference_mode():
            for step in self._steps:
                step.replay()

    def update(self, cpu_update_input: list[dict[str, Any]]) -> None:
        """New host arguments for the captured FIA calls: one dict for all of them, or one per call
        in capture order. The real update re-issues each task with them; here the next replays use them."""
        if not self.auto_dispatch_capture:
            raise RuntimeError("The current graph configuration does not support update,Try to capture by "
                               "setting auto_dispatch_capture=True during capture (emulated)")
        if self._steps is None:
            raise GraphCaptureError("NPUGraph (emulated): update before a finished capture")
        updates = list(cpu_update_input)
        if len(updates) == 1:
            updates = updates * len(self._records)
        if len(updates) != len(self._records):
            # torch_npu 2.13/2.14 zips the two lists (a short list silently leaves calls stale)
            raise GraphCaptureError(f"NPUGraph.update (emulated): {len(self._records)} captured "
                                    f"{FIA} calls, {len(updates)} update dicts")
        allowed = set(inspect.signature(self._records[0].fn).parameters) if self._records else set()
        for record, update in zip(self._records, updates):
            for key, value in update.items():
                if key not in allowed:
                    raise TypeError(f"{FIA}() got an unexpected keyword argument '{key}' (NPUGraph.update)")
                record.kwargs[key] = value

    @property
    def update_records(self) -> int:
        """How many FIA calls an ``update`` refreshes (emulator only)."""
        return len(self._records)

    def reset(self) -> None:
        self._abort()
        self._steps = None
        self.plain_ops = ()

    def pool(self) -> tuple[int, int]:
        """An opaque token for sharing this graph's memory pool (nothing is shared on the CPU)."""
        return (0, id(self))

    @property
    def op_count(self) -> int:
        """How many ops the capture recorded (emulator only: the launches a replay saves)."""
        return len(self._steps or ())


def graph_pool_handle() -> tuple[int, int]:
    """``torch_npu.npu.graph_pool_handle()``: an opaque pool token."""
    return (0, 0)


class graph:  # noqa: N801 - the torch_npu name
    """``with torch_npu.npu.graph(g, pool=None, stream=None, auto_dispatch_capture=False,
    capture_error_mode="global"):`` captures the block into ``g``; ``__enter__`` returns None (as
    torch_npu's); an exception aborts the capture."""

    def __init__(self, npu_graph: NPUGraph, pool: object = None, stream: object = None,
                 auto_dispatch_capture: bool = False, capture_error_mode: str = "global") -> None:
        self.npu_graph = npu_graph
        self.pool = pool
        self.capture_error_mode = capture_error_mode
        npu_graph.auto_dispatch_capture = auto_dispatch_capture

    def __enter__(self) -> None:
        self.npu_graph.capture_begin(self.pool, capture_error_mode=self.capture_error_mode)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.npu_graph._abort()
            return
        self.npu_graph.capture_end()
