"""Decode graphs where they cannot run (cpu, no cache) fail with one clear error; on a CUDA GPU
or a real Ascend NPU the graphed generation equals the eager one (skipped without hardware;
the same code path runs on the CPU in tests/npu/test_npu_decode_graph.py under the emulator)."""
from __future__ import annotations

import pytest
import torch

import hal
from hal.errors import DeviceUnavailable, InputError
from hal.probing import devices, reset
from model.decode_graph import DecodeGraph

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3], [900, 2, 33]]


def test_cpu_has_no_decode_graphs(tiny_model):
    cache = tiny_model.new_cache(1, 8)
    with pytest.raises(DeviceUnavailable, match="decode graphs need a cuda or npu device; cpu has none"):
        DecodeGraph(tiny_model, cache)
    with pytest.raises(DeviceUnavailable, match="decode graphs need a cuda or npu device"):
        tiny_model.generate(PROMPTS, 3, decode_graph=True)


def test_decode_graph_needs_the_cache(tiny_model):
    with pytest.raises(InputError, match="decode_graph=True needs use_cache=True"):
        tiny_model.generate(PROMPTS, 3, decode_graph=True, use_cache=False)


def _available(kind: str) -> bool:
    return next(d for d in devices() if d.name == kind).available


@pytest.mark.parametrize("kind", ["cuda", "npu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphed_generation_equals_eager_on_hardware(tiny_checkpoint, kind, dtype, monkeypatch):
    monkeypatch.delenv("HAL_NPU_EMULATE", raising=False)
    reset()
    if not _available(kind):
        pytest.skip(f"needs a {kind} device (the emulated NPU path is tests/npu/test_npu_decode_graph.py)")
    model = hal.load_model(tiny_checkpoint, kind, dtype)
    eager = model.generate(PROMPTS, max_new_tokens=12, do_sample=False)
    graphed = model.generate(PROMPTS, max_new_tokens=12, do_sample=False, decode_graph=True)
    assert graphed == eager
    assert torch.isfinite(model.logits(torch.tensor([PROMPTS[0]]))).all()


def test_decode_graph_benchmark_without_the_device_exits_2(capsys, monkeypatch):
    from benchmarks import decode_graph

    monkeypatch.delenv("HAL_NPU_EMULATE", raising=False)
    reset()
    if _available("cuda"):
        pytest.skip("a CUDA device is present")
    assert decode_graph.main(["--device", "cuda", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device 'cuda' is not available: ") and len(err.splitlines()) == 1
