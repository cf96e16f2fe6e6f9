"""cpu.onednn linear (backends/cpu/linear_onednn.py). Its NMSE grid against the reference runs in
test_linear.py (every CPU implementation of ``linear``); here, against float64 products: the eager
oneDNN path, the one-row reduction it is traced as (what the compiled decode layer runs:
tests/test_compiled_decode.py holds that step to the eager one), the layouts it hands to F.linear,
its refusals, and that a float32 model binds it on the checkpoint's own `[O, K]` weights."""
from __future__ import annotations

import pytest
import torch

import hal
from backends.cpu import linear_onednn as dnn
from hal.ops import get_spec
from hal.registry import BindContext, bind
from validation.opcheck import nmse
from cpu_conformance import assert_conforms, params

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
FLOAT32 = get_spec("linear").tolerance("float32")


def _case(rows: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(300, 96, generator=gen)
    x = torch.randn(1, rows, 96, generator=gen)
    return x, weight, x.double() @ weight.double().T


@pytest.mark.parametrize("rows", [1, 7, 40])
def test_eager_against_float64_products(rows):
    x, weight, want = _case(rows, rows)
    got = dnn.linear_onednn(x, weight)
    assert got.shape == (1, rows, 300) and got.dtype == torch.float32
    assert nmse(want, got.double()) <= FLOAT32


@pytest.mark.parametrize("rows", [1, 7])
def test_the_traced_formulation_against_float64_products(rows, monkeypatch):
    """What is traced (one row: the reduction; more: F.linear), run eagerly."""
    x, weight, want = _case(rows, 10 + rows)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert nmse(want, dnn.linear_onednn(x, weight).double()) <= FLOAT32


def test_export_traces_one_row_as_a_reduction_without_onednn():
    class Product(torch.nn.Module):
        def forward(self, x, weight):
            return dnn.linear_onednn(x, weight)

    x, weight, want = _case(1, 3)
    program = torch.export.export(Product(), (x, weight), strict=False)
    names = {str(node.target).split(".")[1] for node in program.graph.nodes if node.op == "call_function"}
    assert not names & {"mm", "addmm", "bmm", "linear", "matmul", "_linear_pointwise"}, names
    assert "sum" in names, names
    assert nmse(want, program.module()(x, weight).double()) <= FLOAT32


def test_other_layouts_and_empty_products_take_f_linear():
    x, weight, want = _case(3, 4)
    strided = weight.t().contiguous().t()  # cpu.torch_kn's layout
    assert nmse(want, dnn.linear_onednn(x, strided).double()) <= FLOAT32
    assert dnn.linear_onednn(torch.randn(0, 96), weight).shape == (0, 300)


def test_supports_names_the_dtype_the_cpu_and_a_missing_onednn(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert dnn.supports(BindContext("cpu", torch.float32)) is None
    assert bind("cpu", torch.float32).record["linear"].impl == "cpu.onednn"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    record = bind("cpu", torch.float32).record["linear"]
    assert record.impl == "cpu.torch_kn"  # where oneDNN's one-row product measured slower
    assert any(q == "cpu.onednn" and "on AVX512 CPUs" in why for q, why in record.passed_over)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert "got bfloat16" in dnn.supports(BindContext("cpu", torch.bfloat16))
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert "built without oneDNN" in dnn.supports(BindContext("cpu", torch.float32))
    assert bind("cpu", torch.float32).record["linear"].impl == "cpu.torch_kn"  # the next float32 choice


def test_a_float32_model_holds_the_checkpoint_layout_and_matches_the_reference(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # where oneDNN binds
    model = hal.load_model(tiny_checkpoint, "cpu", "float32")
    assert model.bound_ops["linear"] == "cpu.onednn"
    weights = [getattr(layer, name) for layer in model.layers for name in ("qkv", "o", "gate_up", "down")]
    assert weights and all(w.is_contiguous() and w.dtype == torch.float32 for w in weights)
    ids = torch.tensor([[1, 5, 9, 200, 3, 77]])
    with torch.inference_mode():
        want = hal.load_model(tiny_checkpoint, "cpu", "float32", reference=True).logits(ids).double()
        got = model.logits(ids).double()
    assert nmse(want, got) <= get_spec("logits").tolerance("float32")


@pytest.mark.parametrize("impl,c", [p for p in params("linear") if p.values[0].qualname == "cpu.onednn"])
def test_conforms_on_any_cpu(impl, c, monkeypatch):
    """The conformance grid (tests/ops/test_linear.py) skips cpu.onednn on the CPUs where it does not bind
    (AVX-512: slower, not wrong); here it runs on every CPU as it would on an AVX2 one."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert_conforms(impl, c)
