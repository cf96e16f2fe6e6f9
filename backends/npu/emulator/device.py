"""The emulated ``torch_npu.npu`` device namespace: one CPU-backed device that says so, its
graphs (``NPUGraph``, ``graph``) and a single synchronous stream."""
from __future__ import annotations

from backends.npu.emulator.graphs import NPUGraph, graph, graph_pool_handle  # noqa: F401  (torch_npu.npu names)

NAME = "Ascend910B2 (emulated on CPU)"


def is_available() -> bool:
    return True


def device_count() -> int:
    return 1


def get_device_name(device: object = None) -> str:
    return NAME


SOC_VERSION = 221
"""Ascend910B2 in torch_npu's SoC enum (``NpuVariables.h``: 220 Ascend910B1, 221 Ascend910B2,
222 Ascend910B2C, 223 Ascend910B3, 224 Ascend910B4)."""


def get_soc_version() -> int:
    return SOC_VERSION


def synchronize(device: object = None) -> None:
    """CPU tensors are synchronous."""


def set_device(device: object = None) -> None:
    """One device; nothing to select."""


# -- graphs and streams (one synchronous CPU "stream") ---------------------------------------

class Stream:
    """``torch_npu.npu.Stream``: CPU work is synchronous, so ordering is already total."""

    def wait_stream(self, other: "Stream") -> None:
        """Nothing to wait for."""

    def synchronize(self) -> None:
        """Nothing to wait for."""


_CURRENT = Stream()


def current_stream(device: object = None) -> Stream:
    return _CURRENT


class stream:  # noqa: N801 - the torch_npu name
    """``with torch_npu.npu.stream(s):`` (no effect on the CPU)."""

    def __init__(self, s: Stream | None) -> None:
        self.s = s

    def __enter__(self) -> Stream | None:
        return self.s

    def __exit__(self, *exc: object) -> None:
        return None
