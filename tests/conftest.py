"""Shared fixtures. Tests never touch the user's cache: HAL_CACHE_DIR points into a temp dir."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HAL_CACHE_DIR", tempfile.mkdtemp(prefix="minicpm-hal-test-cache-"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny synthetic checkpoint (tied embeddings, LongRoPE long factors, mscale != 1)."""
    from model.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint loaded on CPU in float32 with the everyday CPU ops."""
    import hal

    return hal.load_model(tiny_checkpoint, "cpu", "float32")
