"""Fixtures of the NPU tests: the emulator switched on (HAL_NPU_EMULATE=1) and cleaned up."""
from __future__ import annotations

import pytest

from backends.npu import emulator
from model.synthetic import write_checkpoint
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


@pytest.fixture(scope="session")
def d64_checkpoint(tmp_path_factory):
    """Tiny preset widened to head_dim 64 (hidden 256, 4 heads, 2 KV heads): FIA's head dims."""
    factors = [1.0 + 0.1 * i for i in range(32)]
    rope = {"rope_type": "longrope", "original_max_position_embeddings": 2048,
            "long_factor": factors, "short_factor": factors}
    return write_checkpoint(tmp_path_factory.mktemp("npu") / "tiny-d64", "tiny", seed=1,
                            overrides={"hidden_size": 256, "rope_scaling": rope})


@pytest.fixture(scope="session")
def d128_checkpoint(tmp_path_factory):
    """Tiny preset widened to head_dim 128 (hidden 512, 4 heads, 2 KV heads): FIA's TND head dim."""
    factors = [1.0 + 0.05 * i for i in range(64)]
    rope = {"rope_type": "longrope", "original_max_position_embeddings": 2048,
            "long_factor": factors, "short_factor": factors}
    return write_checkpoint(tmp_path_factory.mktemp("npu") / "tiny-d128", "tiny", seed=2,
                            overrides={"hidden_size": 512, "rope_scaling": rope})
