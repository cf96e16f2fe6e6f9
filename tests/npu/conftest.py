"""Fixtures of the NPU tests: the emulator switched on (HAL_NPU_EMULATE=1) and cleaned up."""
from __future__ import annotations

import pytest

from backends.npu import emulator
from hal.probing import reset as reset_probes


@pytest.fixture
def emulated(monkeypatch):
    """HAL_NPU_EMULATE=1 for one test; the emulator module is returned and uninstalled after."""
    monkeypatch.setenv("HAL_NPU_EMULATE", "1")
    reset_probes()
    yield emulator
    emulator.uninstall()
    reset_probes()


@pytest.fixture
def no_npu_env(monkeypatch):
    """No emulation and no torch_npu module in sys.modules (probing sees this machine as it is)."""
    monkeypatch.delenv("HAL_NPU_EMULATE", raising=False)
    emulator.uninstall()
    reset_probes()
    yield
    reset_probes()
