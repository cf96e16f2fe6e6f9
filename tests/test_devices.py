"""Device probing: lazy, never raises, explains itself."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import hal

from hal import probing as dev


@pytest.fixture(autouse=True)
def fresh_probes():
    dev.reset()
    yield
    dev.reset()


def test_devices_lists_every_kind_with_reasons():
    found = {d.name: d for d in hal.devices()}
    assert list(found) == ["cpu", "cuda", "npu"]
    assert found["cpu"].available and found["cpu"].reason == ""
    for d in found.values():
        assert isinstance(d.available, bool)
        assert d.available or d.reason  # unavailable always says why
    if not torch.cuda.is_available():
        assert not found["cuda"].available
        assert "CUDA" in found["cuda"].reason or "CPU-only" in found["cuda"].reason


def test_auto_prefers_available_accelerators(monkeypatch):
    monkeypatch.setitem(dev.PROBES, "npu", lambda: dev.Device("npu", False, "no npu"))
    monkeypatch.setitem(dev.PROBES, "cuda", lambda: dev.Device("cuda", True, "", "fake"))
    assert dev.resolve("auto") == "cuda"
    dev.reset()
    monkeypatch.setitem(dev.PROBES, "cuda", lambda: dev.Device("cuda", False, "no gpu"))
    assert dev.resolve("auto") == "cpu"
    monkeypatch.setenv("HAL_DEVICE", "cpu")
    assert dev.resolve(None) == "cpu"


def test_unavailable_and_unknown_devices_raise_one_line(monkeypatch):
    monkeypatch.setitem(dev.PROBES, "cuda", lambda: dev.Device("cuda", False, "torch is a CPU-only build"))
    with pytest.raises(hal.DeviceUnavailable,
                       match=r"^device 'cuda' is not available: torch is a CPU-only build$"):
        dev.resolve("cuda")
    with pytest.raises(hal.DeviceUnavailable,
                       match="unknown device 'gpu'; choose one of: auto, cpu, cuda, npu"):
        dev.resolve("gpu")
    with pytest.raises(hal.DeviceUnavailable, match="only index 0"):
        dev.resolve("cpu:1")


def test_a_crashing_probe_is_reported_not_raised(monkeypatch):
    def broken():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    found = dev.probe_cuda()
    assert not found.available and "driver exploded" in found.reason


def test_importing_hal_probes_nothing_and_imports_no_accelerator_library():
    code = ("import sys, hal, hal.registry; hal.registry.implementations('rms_norm'); "
            "print(sorted(m for m in ('torch_npu', 'triton') if m in sys.modules)); "
            "print(len(sys.modules['hal.probing']._CACHE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "0"]  # no accelerator module imported, no probe run
