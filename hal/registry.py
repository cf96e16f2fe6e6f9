"""Backend registry and binding.

Backends register implementations as data (:class:`Impl`); nothing is imported until an op is
bound. :func:`bind` resolves every catalogue op once for a (device, dtype, model shapes)
triple and returns :class:`BoundOps`: the callables plus a record of which implementation
serves each op and why the others were passed over. There is no per-call dispatch.
"""
from __future__ import annotations

import functools
import importlib
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from hal import env
from hal.probing import torch_device
from hal.errors import InputError, UnsupportedOpError
from hal.ops import CATALOGUE
from hal.quant import QuantizedWeight

log = logging.getLogger("hal")

BACKEND_PACKAGES = {"cpu": "backends.cpu", "cuda": "backends.cuda", "npu": "backends.npu"}


@dataclass(frozen=True)
class BindContext:
    """What ``supports()`` may look at: never tensor data, only the call's static facts.

    ``shapes`` holds the model's sizes: ``E``, ``F``, ``V``, ``H``, ``Hk``, ``D``."""

    device: str
    dtype: torch.dtype
    shapes: dict[str, int] = field(default_factory=dict)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


SupportsFn = Callable[[BindContext], "str | None"]


def always(_: BindContext) -> str | None:
    return None


@dataclass(frozen=True)
class Impl:
    """One implementation of one op.

    op: catalogue name. backend: ``cpu`` / ``cuda`` / ``npu`` (the device kind it runs on).
    name: the variant (``reference``, ``torch``, ``triton``, ``torch_npu``, ...).
    fn: ``"module.path:function"``, imported at bind time. supports: returns None when the
    call is supported, else ``"<backend>.<op>: <what> must be <allowed>, got <value>"``.
    priority: lower wins among supported candidates. capturable: safe inside a device graph
    capture (NPUGraph / CUDAGraph): never reads tensor values on the host and its output shapes
    depend on input shapes only (checked for every such impl under the emulated NPUGraph).
    graph_update: capturable only in a graph whose runtime refreshes the op's host length arguments
    before each replay (``NPUGraph.update`` after ``auto_dispatch_capture``; the caller gives the
    lengths at capture through :func:`hal.graphs.host_kv_lens`), see ``GraphRuntime.refresh``.
    prepare: ``"module.path:function"`` or None, for ops whose weights the implementation
    repacks once at bind time: ``prepare(weight, ctx) -> object`` turns a ``hal.quant`` container
    (the quantized linears), a dense lm_head (``logits``: ``cpu.fbgemm``'s packed float16 copy) or a
    dense linear weight (``linear``: ``cpu.torch_kn``'s pre-transposed copy, same values) into what
    ``fn`` receives; None passes the weight unchanged.
    """

    op: str
    backend: str
    name: str
    fn: str
    supports: SupportsFn = always
    priority: int = 0
    capturable: bool = False
    graph_update: bool = False
    prepare: str | None = None

    @property
    def qualname(self) -> str:
        return f"{self.backend}.{self.name}"

    def load(self) -> Callable[..., Any]:
        return _import(self.fn)

    def load_prepare(self) -> Callable[..., Any] | None:
        return _import(self.prepare) if self.prepare else None


def _import(path: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


_IMPLS: list[Impl] = []
_LOADED_BACKENDS: set[str] = set()


def register(impl: Impl) -> None:
    if impl.op not in CATALOGUE:
        raise KeyError(f"register: op {impl.op!r} is not in the catalogue")
    if any(i.op == impl.op and i.qualname == impl.qualname for i in _IMPLS):
        raise ValueError(f"register: {impl.qualname} already registered for {impl.op}")
    _IMPLS.append(impl)


def _ensure_backend(kind: str) -> None:
    if kind not in _LOADED_BACKENDS:
        importlib.import_module(BACKEND_PACKAGES[kind])
        _LOADED_BACKENDS.add(kind)


def implementations(op: str, backend: str | None = None) -> list[Impl]:
    """Registered implementations of ``op`` (optionally of one backend), best priority first."""
    for kind in ([backend] if backend else BACKEND_PACKAGES):
        _ensure_backend(kind)
    found = [i for i in _IMPLS if i.op == op and (backend is None or i.backend == backend)]
    return sorted(found, key=lambda i: i.priority)


@dataclass(frozen=True)
class Binding:
    """Which implementation serves one op, and what was passed over (qualname, reason)."""

    op: str
    impl: str
    fallback: bool
    passed_over: tuple[tuple[str, str], ...]
    preferred: bool = False
    """The caller asked for this implementation (``prefer=``): later swaps (the CPU decode step's
    ``cpu.decode`` variants) keep it."""

    def describe(self) -> str:
        text = f"{self.op} -> {self.impl}" + (" (CPU fallback)" if self.fallback else "")
        if self.passed_over:
            text += " (" + "; ".join(f"{q}: {r}" for q, r in self.passed_over) + ")"
        return text


class BoundOps:
    """The resolved op table: ``ops.rms_norm(...)`` calls the bound implementation directly."""

    def __init__(self, fns: dict[str, Callable[..., Any]], record: dict[str, Binding], ctx: BindContext,
                 prepares: dict[str, Callable[..., Any]] | None = None):
        self._fns = fns
        self._prepares = dict(prepares or {})
        self.record = record
        self.context = ctx
        for name, fn in fns.items():
            setattr(self, name, fn)

    def prepare(self, op: str, weight: Any) -> Any:
        """What the implementation bound to ``op`` receives for ``weight`` (a ``hal.quant``
        container, the dense lm_head of ``logits``, a dense ``linear`` weight): its own layout, made
        once here; the weight itself when it has no prepare."""
        fn = self._prepares.get(op)
        return weight if fn is None else fn(weight, self.context)

    def with_impls(self, impls: dict[str, tuple[Callable[..., Any], Binding]]) -> "BoundOps":
        """A copy with each op of ``impls`` served by its (callable, binding); the other ops keep
        their current attribute (a test may have patched one), record and prepare function."""
        fns = {op: getattr(self, op) for op in self._fns}
        record = dict(self.record)
        for op, (fn, binding) in impls.items():
            if op not in fns:
                raise KeyError(f"with_impls: op {op!r} is not bound")
            fns[op] = fn
            record[op] = binding
        return BoundOps(fns, record, self.context, self._prepares)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {
            op: {"impl": b.impl, "fallback": b.fallback, "passed_over": [list(p) for p in b.passed_over]}
            for op, b in self.record.items()
        }

    def __repr__(self) -> str:
        return "BoundOps(\n  " + "\n  ".join(b.describe() for b in self.record.values()) + "\n)"


def _on_cpu(fn: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    """Wrap a CPU implementation so it can serve another device (explicit fallback only)."""

    def to(obj: Any, dev: torch.device) -> Any:
        if isinstance(obj, (torch.Tensor, QuantizedWeight)):
            return obj.to(dev)
        if isinstance(obj, tuple):
            return tuple(to(o, dev) for o in obj)
        return obj

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        cpu = torch.device("cpu")
        out = fn(*to(args, cpu), **{k: to(v, cpu) for k, v in kwargs.items()})
        return to(out, device)

    return wrapper


def _check_prefer(prefer: dict[str, str], device: str) -> None:
    """InputError (one line) for an op not in the catalogue or a qualname that is not one of its
    ``device`` implementations."""
    for op, qualname in prefer.items():
        if op not in CATALOGUE:
            raise InputError(f"prefer: unknown op {op!r}; the catalogue has: {', '.join(CATALOGUE)}")
        names = [i.qualname for i in implementations(op, device)]
        if qualname not in names:
            raise InputError(f"prefer: {op} has no {device} implementation {qualname!r}; choose from "
                             f"{', '.join(names) or 'none'}")


def bind(
    device: str,
    dtype: torch.dtype,
    shapes: dict[str, int] | None = None,
    *,
    reference: bool = False,
    allow_fallback: bool = False,
    overrides: dict[str, Callable[..., Any]] | None = None,
    capture: frozenset[str] = frozenset(),
    graph_updates: bool = False,
    prefer: dict[str, str] | None = None,
) -> BoundOps:
    """Resolve every catalogue op once.

    Args:
        device: device kind the model runs on (``cpu``, ``cuda``, ``npu``).
        dtype: activation/weight dtype of the model.
        shapes: model sizes for ``supports()`` (see :class:`BindContext`).
        reference: on ``cpu``, bind the float32 reference implementations (the judge).
        allow_fallback: let an op no ``device`` implementation supports run on the CPU
            reference (warned once per op, marked in the record). Default: raise.
        overrides: op name -> callable, used instead of the registry (tests, fault injection);
            recorded as ``override``.
        capture: ops that will run inside a graph capture: only ``capturable`` implementations
            may serve them (the others are passed over with that reason).
        graph_updates: the graph runtime refreshes host lengths before each replay, so
            ``graph_update`` implementations may serve ``capture`` ops too.
        prefer: op name -> implementation qualname (``{"linear_ternary": "cpu.torch_2bit"}``)
            tried before the priority order; one that does not support the call is passed over
            as usual (its reason in the record, warned once). Default: priority order only.

    Raises:
        UnsupportedOpError: an op has no supporting implementation (all reasons listed).
    """
    unknown = sorted(set(overrides or {}) - set(CATALOGUE))
    if unknown:
        raise InputError(f"op_overrides: unknown op {unknown[0]!r}; "
                         f"the catalogue has: {', '.join(CATALOGUE)}")
    not_callable = sorted(op for op, fn in (overrides or {}).items() if not callable(fn))
    if not_callable:
        raise InputError(f"op_overrides: {not_callable[0]!r} must map to a callable, "
                         f"got {overrides[not_callable[0]]!r}"[:200])
    prefer = dict(prefer or {})
    _check_prefer(prefer, device)
    ctx = BindContext(device=device, dtype=dtype, shapes=dict(shapes or {}))
    disabled = env.disabled_backends()
    fns: dict[str, Callable[..., Any]] = {}
    prepares: dict[str, Callable[..., Any]] = {}
    record: dict[str, Binding] = {}
    failures: list[str] = []
    for op in CATALOGUE:
        if overrides and op in overrides:
            fns[op] = overrides[op]
            record[op] = Binding(op, "override", False, ())
            continue
        passed: list[tuple[str, str]] = []
        chosen: Impl | None = None
        for impl in sorted(implementations(op, device), key=lambda i: i.qualname != prefer.get(op)):
            if impl.backend in disabled:
                passed.append((impl.qualname, "disabled by HAL_DISABLE_BACKENDS"))
                continue
            if reference != (impl.name == "reference"):
                why = "reference mode binds the reference" if reference else "the reference is the judge only"
                passed.append((impl.qualname, why))
                continue
            reason = impl.supports(ctx)
            if reason is None and op in capture and not impl.capturable:
                reason = "not capturable in a device graph (reads tensor values on the host)"
            if reason is None and op in capture and impl.graph_update and not graph_updates:
                reason = ("captured only where the graph refreshes its host lengths before each replay "
                          "(NPUGraph.update); this graph runtime has no update")
            if reason is None and chosen is None:
                chosen = impl
            elif reason is not None:
                passed.append((impl.qualname, reason))
        if op in prefer and (chosen is None or chosen.qualname != prefer[op]):
            why = next((r for q, r in passed if q == prefer[op]), f"{chosen.qualname if chosen else 'another'} was chosen")
            warnings.warn(f"prefer: {op} -> {prefer[op]} passed over: {why}", stacklevel=2)
        if chosen is not None:
            fns[op] = chosen.load()
            prepare = chosen.load_prepare()
            if prepare is not None:
                prepares[op] = prepare
            record[op] = Binding(op, chosen.qualname, False, tuple(passed), prefer.get(op) == chosen.qualname)
            continue
        if allow_fallback and device != "cpu" and op not in capture:
            ref = next(i for i in implementations(op, "cpu") if i.name == "reference")
            fns[op] = _on_cpu(ref.load(), torch_device(device))
            record[op] = Binding(op, ref.qualname, True, tuple(passed))
            why = "; ".join(r for _, r in passed) or "no implementation registered"
            warnings.warn(f"op {op} runs on the CPU reference: {why}", stacklevel=2)
            continue
        why = "; ".join(f"{q}: {r}" for q, r in passed) or f"no {device} implementation registered"
        failures.append(f"{op} ({why})")
    if failures:
        raise UnsupportedOpError(
            f"no {device} implementation supports {ctx.dtype_name} for: " + ", ".join(failures)
            + ("" if allow_fallback else "; pass allow_fallback=True (--allow-fallback) to run them on CPU")
        )
    return BoundOps(fns, record, ctx, prepares)
