"""Every environment knob the project reads, in one place.

HAL_DEVICE               device used when the caller asks for ``"auto"`` (``cpu``, ``cuda``, ``npu``).
HAL_DISABLE_BACKENDS     comma-separated backends to ignore when binding ops (e.g. ``npu,cuda``),
                         to bisect a wrong answer. ``cpu`` cannot be disabled.
HAL_NPU_EMULATE          ``1`` runs the ``npu`` device on an emulator: a pure-torch stand-in for
                         torch_npu (``backends/npu/emulator``) injected as ``torch_npu``, tensors on
                         the CPU. ``hal.devices()`` then reports npu as available with a description
                         containing "emulated", and every report says EMULATED. For tests and CI
                         on machines without an Ascend NPU; never hardware numbers.
HAL_CACHE_DIR            where the built-in synthetic checkpoint is written, and the trained fixture
                         is fetched (``trained/``, ``python -m model.trained --fetch``).
                         Default: ``$XDG_CACHE_HOME/minicpm-hal`` or ``~/.cache/minicpm-hal``.
"""
from __future__ import annotations

import os
from pathlib import Path


def device_override() -> str | None:
    value = os.environ.get("HAL_DEVICE", "").strip().lower()
    return value or None


def disabled_backends() -> frozenset[str]:
    raw = os.environ.get("HAL_DISABLE_BACKENDS", "")
    return frozenset(part.strip().lower() for part in raw.split(",") if part.strip()) - {"cpu"}


def npu_emulate() -> bool:
    return os.environ.get("HAL_NPU_EMULATE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    explicit = os.environ.get("HAL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minicpm-hal"
