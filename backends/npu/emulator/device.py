"""The emulated ``torch_npu.npu`` device namespace: one CPU-backed device that says so."""
from __future__ import annotations

NAME = "Ascend910B2 (emulated on CPU)"


def is_available() -> bool:
    return True


def device_count() -> int:
    return 1


def get_device_name(device: object = None) -> str:
    return NAME


def get_soc_version() -> int:
    return 222  # Ascend910B2 in torch_npu's SoC enum


def synchronize(device: object = None) -> None:
    """CPU tensors are synchronous."""


def set_device(device: object = None) -> None:
    """One device; nothing to select."""
