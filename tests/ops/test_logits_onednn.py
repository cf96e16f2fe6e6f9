"""cpu.onednn logits (backends/cpu/logits_onednn.py) beyond the conformance grid (tests/ops/test_logits.py
holds it to the catalogue tolerance on every case): float64 products as the independent reference, the
layouts it hands to cpu.torch, its refusals, and that a float32 model binds it."""
from __future__ import annotations

import pytest
import torch

import hal
from backends.cpu import logits_onednn as dnn
from hal.ops import get_spec
from hal.registry import BindContext

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _nmse(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double() - want) ** 2).mean() / (want ** 2).mean())


@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("layout", ["contiguous", "transposed view"])
def test_logits_against_float64_products(rows, layout):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(1000, 96, generator=gen)
    if layout == "transposed view":  # what cpu.torch_kn holds: handed to cpu.torch's F.linear
        weight = weight.t().contiguous().t()
    x = torch.randn(2, rows, 96, generator=gen)
    got = dnn.logits_onednn(x, weight)
    assert got.shape == (2, rows, 1000) and got.dtype == torch.float32
    assert _nmse(got, x.double() @ weight.double().t()) < get_spec("logits").tolerance("float32")


def test_empty_rows_give_an_empty_result():
    assert dnn.logits_onednn(torch.randn(0, 8), torch.randn(10, 8)).shape == (0, 10)


def test_supports_names_the_dtype_and_a_missing_onednn(monkeypatch):
    assert dnn.supports(BindContext("cpu", torch.float32)) is None
    assert "dtype must be float32" in dnn.supports(BindContext("cpu", torch.bfloat16))
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert "built without oneDNN" in dnn.supports(BindContext("cpu", torch.float32))


def test_a_float32_model_binds_it(tiny_checkpoint):
    model = hal.load_model(tiny_checkpoint, "cpu", "float32")
    assert model.bound_ops["logits"] == "cpu.onednn"
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.inference_mode():
        ours = model.logits(ids)
        ref = hal.load_model(tiny_checkpoint, "cpu", "float32", prefer={"logits": "cpu.reference"}).logits(ids)
    assert _nmse(ours, ref.double()) < get_spec("logits").tolerance("float32")
