"""Lazy device probing that never raises and explains itself.

One probe per device kind returns a :class:`Device`. Probes run on the first
:func:`devices` call (never at import) and are cached; :func:`reset` clears the cache for tests.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

from hal import env
from hal.errors import DeviceUnavailable, InputError

KINDS = ("cpu", "cuda", "npu")
AUTO_ORDER = ("npu", "cuda", "cpu")


@dataclass(frozen=True)
class Device:
    """name: ``cpu`` / ``cuda`` / ``npu``. available: usable now. reason: why not (``""`` if
    available). description: what was found (card name, count)."""

    name: str
    available: bool
    reason: str = ""
    description: str = ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def probe_cpu() -> Device:
    import platform

    return Device("cpu", True, "", f"{platform.machine()} ({os.cpu_count()} logical cores)")


def probe_cuda() -> Device:
    try:
        import torch

        if not torch.cuda.is_available():
            built = torch.version.cuda
            why = ("torch is a CPU-only build" if built is None
                   else "torch sees no CUDA GPU (driver or device missing)")
            return Device("cuda", False, why)
        count = torch.cuda.device_count()
        return Device("cuda", True, "", f"{count} x {torch.cuda.get_device_name(0)}")
    except Exception as exc:  # noqa: BLE001 - a probe must never raise
        return Device("cuda", False, f"CUDA probe failed: {_first_line(exc)}")


_MISSING_LIB = re.compile(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file")


def explain_npu_import_error(exc: BaseException) -> str:
    """Turn a torch_npu import failure into the one-line cause a user can act on."""
    message = str(exc)
    missing = _MISSING_LIB.search(message)
    if missing:
        return (
            f"torch_npu import failed: CANN library {missing.group(1)} not found "
            "(install the CANN toolkit and run 'source <CANN>/set_env.sh')"
        )
    return f"torch_npu import failed: {_first_line(exc)}"


def probe_npu() -> Device:
    if env.npu_emulate():
        from backends.npu.emulator import DESCRIPTION, install

        install()
        return Device("npu", True, "", DESCRIPTION)
    if importlib.util.find_spec("torch_npu") is None:
        return Device("npu", False,
                      "torch_npu not installed (pip install 'minicpm-hal[npu]' on an Ascend host)")
    try:
        importlib.import_module("torch_npu")
    except Exception as exc:  # noqa: BLE001
        return Device("npu", False, explain_npu_import_error(exc))
    try:
        import torch

        npu = getattr(torch, "npu", None)
        if npu is None:
            return Device("npu", False,
                          "torch_npu imported but torch.npu is missing (torch/torch_npu mismatch)")
        count = npu.device_count()
        if count == 0:
            visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
            hint = f" (ASCEND_RT_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
            return Device("npu", False, f"0 NPUs visible{hint}: check the driver with npu-smi info")
        return Device("npu", True, "", f"{count} x {npu.get_device_name(0)}")
    except Exception as exc:  # noqa: BLE001
        return Device("npu", False, f"NPU driver error: {_first_line(exc)}")


PROBES: dict[str, Callable[[], Device]] = {"cpu": probe_cpu, "cuda": probe_cuda, "npu": probe_npu}
_CACHE: dict[str, Device] = {}


def reset() -> None:
    _CACHE.clear()


def probe(kind: str) -> Device:
    if kind not in PROBES:
        raise DeviceUnavailable(f"unknown device {kind!r}; choose one of: auto, {', '.join(KINDS)}")
    if kind not in _CACHE:
        _CACHE[kind] = PROBES[kind]()
    return _CACHE[kind]


def devices() -> list[Device]:
    """Every known device kind, probed (cached), in the order cpu, cuda, npu."""
    return [probe(kind) for kind in KINDS]


def resolve(requested: "str | torch.device | None") -> str:
    """Canonical device kind for a user's request, or :class:`DeviceUnavailable` with the reason.

    ``auto`` (or None) honours ``HAL_DEVICE`` and then picks npu > cuda > cpu. ``cuda:0`` and
    ``npu:0`` are accepted as ``cuda`` / ``npu`` (index 0 only), and so is a ``torch.device``
    (``torch.device("cpu")``, ``torch.device("cuda", 0)``). Anything else (``""``, ``0``) is an
    :class:`InputError` naming the value.
    """
    if requested is None:
        name = "auto"
    elif "torch" in sys.modules and isinstance(requested, sys.modules["torch"].device):
        name = requested.type if requested.index is None else f"{requested.type}:{requested.index}"
    elif isinstance(requested, str):
        name = requested.strip().lower()
    else:
        raise InputError(f"device must be a string such as 'auto', 'cpu', 'cuda' or 'npu' "
                         f"(or a torch.device), got {requested!r}")
    if not name:
        raise InputError(f"device {requested!r} is empty; choose one of: auto, {', '.join(KINDS)}")
    if name == "auto":
        override = env.device_override()
        if override and override != "auto":
            try:
                return resolve(override)
            except DeviceUnavailable as exc:
                raise DeviceUnavailable(f"HAL_DEVICE={override!r}: {exc}") from None
        return next(kind for kind in AUTO_ORDER if probe(kind).available)
    kind, _, index = name.partition(":")
    if kind not in KINDS:
        raise DeviceUnavailable(f"unknown device {str(requested)!r}; choose one of: auto, {', '.join(KINDS)}")
    if index not in ("", "0"):
        raise DeviceUnavailable(f"device {str(requested)!r}: only index 0 is supported")
    found = probe(kind)
    if not found.available:
        raise DeviceUnavailable(f"device {kind!r} is not available: {found.reason}")
    return kind


def torch_device(kind: str) -> "torch.device":
    """Where a device kind's tensors live: ``cpu``, ``cuda:0``, ``npu:0``; the emulated NPU
    (HAL_NPU_EMULATE=1) keeps its tensors on the CPU."""
    import torch

    if kind == "cpu" or (kind == "npu" and env.npu_emulate()):
        return torch.device("cpu")
    return torch.device(f"{kind}:0")
