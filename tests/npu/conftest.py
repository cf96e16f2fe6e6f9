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


def _widened(tmp_path_factory, head_dim: int, seed: int, factor_step: float):
    """Tiny preset widened to ``head_dim`` (hidden 4 x head_dim, 4 heads, 2 KV heads) with LongRoPE
    factors 1, 1 + step, ... (head_dim / 2 of them)."""
    factors = [1.0 + factor_step * i for i in range(head_dim // 2)]
    rope = {"rope_type": "longrope", "original_max_position_embeddings": 2048,
            "long_factor": factors, "short_factor": factors}
    return write_checkpoint(tmp_path_factory.mktemp("npu") / f"tiny-d{head_dim}", "tiny", seed=seed,
                            overrides={"hidden_size": 4 * head_dim, "rope_scaling": rope})


@pytest.fixture(scope="session")
def d64_checkpoint(tmp_path_factory):
    """head_dim 64 (hidden 256): FIA's head dims."""
    return _widened(tmp_path_factory, 64, seed=1, factor_step=0.1)


@pytest.fixture(scope="session")
def d128_checkpoint(tmp_path_factory):
    """head_dim 128 (hidden 512): FIA's TND head dim."""
    return _widened(tmp_path_factory, 128, seed=2, factor_step=0.05)
