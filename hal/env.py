"""Every environment knob the project reads, in one place.

HAL_DEVICE               device used when the caller asks for ``"auto"`` (``cpu``, ``cuda``, ``npu``);
                         a bad value is an error that names the variable.
HAL_DISABLE_BACKENDS     comma-separated backends to ignore when binding ops (e.g. ``npu,cuda``),
                         to bisect a wrong answer. ``cpu`` cannot be disabled (it is accepted and
                         ignored); any other name is an error that names the variable.
HAL_NPU_EMULATE          ``1`` runs the ``npu`` device on an emulator: a pure-torch stand-in for
                         torch_npu (``backends/npu/emulator``) injected as ``torch_npu``, tensors on
                         the CPU. ``hal.devices()`` then reports npu as available with a description
                         containing "emulated", and every report says EMULATED. For tests and CI
                         on machines without an Ascend NPU; never hardware numbers.
HAL_NPU_FIA_LAYOUT       ``TND`` or ``BSND``: bind only that layout's fused attention on the npu device
                         (default: TND for the head dims its docs give, BSND otherwise). For the
                         runbook to measure both paths on one model; other values are refused.
HAL_TP_TIMEOUT           seconds a tensor-parallel rank waits for its peers (process-group rendezvous
                         and every collective) before giving up with one line. Default: 300.
HAL_CACHE_DIR            where the built-in synthetic checkpoint is written, and the trained fixture
                         is fetched (``trained/``, ``python -m model.trained --fetch``).
                         Default: ``$XDG_CACHE_HOME/minicpm-hal`` or ``~/.cache/minicpm-hal``.
"""
from __future__ import annotations

import os
from pathlib import Path

from hal.errors import InputError

BACKENDS = ("cpu", "cuda", "npu")


def device_override() -> str | None:
    value = os.environ.get("HAL_DEVICE", "").strip().lower()
    return value or None


def disabled_backends() -> frozenset[str]:
    raw = os.environ.get("HAL_DISABLE_BACKENDS", "")
    names = frozenset(part.strip().lower() for part in raw.split(",") if part.strip())
    unknown = sorted(names - set(BACKENDS))
    if unknown:
        raise InputError(f"HAL_DISABLE_BACKENDS={raw!r}: unknown backend {unknown[0]!r}; "
                         f"choose from {', '.join(BACKENDS[1:])} (cpu cannot be disabled)")
    return names - {"cpu"}


def npu_emulate() -> bool:
    return os.environ.get("HAL_NPU_EMULATE", "").strip().lower() in ("1", "true", "yes", "on")


FIA_LAYOUTS = ("TND", "BSND")


def npu_fia_layout() -> str | None:
    """HAL_NPU_FIA_LAYOUT upper-cased, or None; InputError (one line) for another value."""
    value = os.environ.get("HAL_NPU_FIA_LAYOUT", "").strip().upper()
    if value and value not in FIA_LAYOUTS:
        from hal.errors import InputError

        raise InputError(f"HAL_NPU_FIA_LAYOUT must be TND or BSND, got {value!r}")
    return value or None


TP_TIMEOUT_DEFAULT = 300.0


def tp_timeout() -> float:
    """HAL_TP_TIMEOUT as seconds > 0 (default :data:`TP_TIMEOUT_DEFAULT`); InputError for another value."""
    raw = os.environ.get("HAL_TP_TIMEOUT", "").strip()
    if not raw:
        return TP_TIMEOUT_DEFAULT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise InputError(f"HAL_TP_TIMEOUT must be a number of seconds > 0, got {raw!r}")
    return value


def cache_dir() -> Path:
    """The cache folder (not created here); see :func:`ensure_cache_dir`."""
    explicit = os.environ.get("HAL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minicpm-hal"


def cache_source() -> str:
    """How the cache folder was chosen, for error messages."""
    return "HAL_CACHE_DIR" if os.environ.get("HAL_CACHE_DIR") else "the default cache folder"


def ensure_cache_dir() -> Path:
    """:func:`cache_dir`, created; a path that is a file (or unwritable) raises :class:`InputError`
    naming the variable."""
    path = cache_dir()
    if path.exists() and not path.is_dir():
        raise InputError(f"{cache_source()} {str(path)!r} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{cache_source()} {str(path)!r} cannot be used as a folder: "
                         f"{exc.strerror or exc}") from None
    return path
