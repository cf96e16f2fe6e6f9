"""Where the NPU backend gets ``torch_npu`` and its device from: the real package on an Ascend
host, or the emulator (``backends/npu/emulator``) when ``HAL_NPU_EMULATE=1``. Nothing is
imported until an op runs."""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

from hal import env


def emulated() -> bool:
    return env.npu_emulate()


def torch_npu() -> ModuleType:
    """The torch_npu module the wrappers call (the emulator under HAL_NPU_EMULATE=1)."""
    if emulated():
        from backends.npu import emulator

        return emulator
    return importlib.import_module("torch_npu")


def device() -> torch.device:
    """The NPU's torch device: ``npu:0``, or the CPU under emulation."""
    return torch.device("cpu") if emulated() else torch.device("npu:0")
