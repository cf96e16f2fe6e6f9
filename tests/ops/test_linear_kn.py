"""cpu.torch_kn (backends/cpu/linear_kn.py): float32 dense linears held pre-transposed. Its NMSE grid
against the reference runs in test_linear.py (every CPU implementation of ``linear``, prepare applied);
here: what it binds, what the model holds (one copy, the prepared layout), the opt-out, and that a model
copy binding other ops or holding other weights computes with those (no stale or foreign layout)."""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F

import hal
from backends.cpu import linear_kn
from hal.ops import get_spec
from hal.registry import BindContext, bind
from model.minicpm import MiniCPMForCausalLM
from model.synthetic import write_checkpoint
from model.tp import weight_bytes
from validation import floor
from validation.opcheck import nmse
from expected_bindings import float32_cpu_linear

LINEARS = ("qkv", "o", "gate_up", "down")
IDS = torch.tensor([[1, 5, 9, 200, 3, 77, 401, 12]])
FLOAT32 = get_spec("linear").tolerance("float32")


def _linears(model) -> list[torch.Tensor]:
    return [getattr(layer, name) for layer in model.layers for name in LINEARS]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Stored in float32, so rounding its weights to bfloat16 changes them."""
    return write_checkpoint(tmp_path_factory.mktemp("kn") / "tiny", "tiny", dtype="float32")


@pytest.fixture(scope="module")
def models(checkpoint):
    return {"kn": hal.load_model(checkpoint, "cpu", "float32", prefer={"linear": "cpu.torch_kn"}),
            "opt-out": hal.load_model(checkpoint, "cpu", "float32", prefer={"linear": "cpu.torch"}),
            "reference": hal.load_model(checkpoint, "cpu", "float32", reference=True)}


def test_binds_float32_only_and_says_why_not():
    """float32 binds cpu.onednn first (tests/ops/test_linear_onednn.py) except on CPUs where it is the
    slower kernel, cpu.torch_kn then or when preferred."""
    assert bind("cpu", torch.float32).record["linear"].impl == \
        float32_cpu_linear()
    assert bind("cpu", torch.float32, prefer={"linear": "cpu.torch_kn"}).record["linear"].impl == "cpu.torch_kn"
    for dtype in (torch.bfloat16, torch.float16):
        record = bind("cpu", dtype).record["linear"]
        assert record.impl == "cpu.torch"
        for impl in ("cpu.onednn", "cpu.torch_kn"):
            assert any(q == impl and "dtype must be float32" in why for q, why in record.passed_over)
    assert "got bfloat16" in linear_kn.supports(BindContext("cpu", torch.bfloat16))


def test_prepare_is_one_transposed_copy_with_the_same_values():
    weight = torch.randn(48, 80)
    prepared = linear_kn.prepare_linear_kn(weight)
    assert prepared.shape == weight.shape and torch.equal(prepared, weight)
    assert prepared.t().is_contiguous() and not prepared.is_contiguous()
    assert prepared.untyped_storage().nbytes() == weight.numel() * weight.element_size()
    assert linear_kn.prepare_linear_kn(prepared) is not None
    assert linear_kn.prepare_linear_kn(prepared).data_ptr() == prepared.data_ptr()  # idempotent: no second copy
    x = torch.randn(2, 3, 80)
    want = x.double() @ weight.double().T
    assert nmse(want, linear_kn.linear_kn(x, prepared).double()) <= FLOAT32
    assert nmse(want, linear_kn.linear_kn(x, weight).double()) <= FLOAT32  # any strides: correct, only slower


def test_the_model_holds_the_prepared_layout_and_no_second_copy(models):
    kn, plain = models["kn"], models["opt-out"]
    assert kn.bound_ops["linear"] == "cpu.torch_kn"
    for weight in _linears(kn):
        assert weight.t().is_contiguous() and not weight.is_contiguous()
        assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
    assert all(w.is_contiguous() for w in _linears(plain))
    assert weight_bytes(kn) == weight_bytes(plain)
    for mine, theirs in zip(_linears(kn), _linears(plain)):
        assert torch.equal(mine, theirs)


def test_the_original_layout_is_freed_at_load(models, checkpoint):
    """The constructor replaces each dense linear of the weights dict by its prepared copy, so the
    `[O, K]` original is not kept alive by the dict until the load ends."""
    from model.checkpoint import load_weights

    model = models["kn"]
    weights = load_weights(checkpoint, model.config, torch.float32, torch.device("cpu"))
    name = "model.layers.0.self_attn.qkv_proj.weight"
    original = weakref.ref(weights[name])
    built = MiniCPMForCausalLM(model.config, weights, model.ops, model.device, torch.float32)
    assert original() is None
    assert weights[name] is built.layers[0].qkv


def test_opt_out_and_kn_give_the_reference_logits(models):
    want = models["reference"].logits(IDS).double()
    for name in ("kn", "opt-out"):
        assert nmse(want, models[name].logits(IDS).double()) <= FLOAT32, name


def test_a_copy_binding_other_ops_reads_the_same_weights(models):
    """The reference ops through the kn model's own (prepared) weights: the reference's logits."""
    kn, reference = models["kn"], models["reference"]
    received = []
    real = reference.ops.linear

    def spy(x, weight):
        received.append(weight.t().is_contiguous())
        return real(x, weight)

    judged = floor.with_ops(kn, reference.ops.with_impls({"linear": (spy, reference.ops.record["linear"])}))
    got = judged.logits(IDS).double()
    assert received and all(received)  # precondition: the reference received the prepared layout
    assert nmse(reference.logits(IDS).double(), got) <= FLOAT32


def test_a_copy_with_rounded_weights_never_computes_with_the_unrounded_ones(models):
    """validation/floor.py's rounded-weights copy of a kn model: its linears are the rounded values, and
    its logits are those of the opt-out model rounded the same way (a stale unrounded copy would give
    the unrounded model's logits, NMSE ~1e-5 away here)."""
    kn, plain = models["kn"], models["opt-out"]
    rounded_kn = floor.weights_rounded(kn, torch.bfloat16)
    rounded_plain = floor.weights_rounded(plain, torch.bfloat16)
    for mine, source in zip(_linears(rounded_kn), _linears(kn)):
        assert torch.equal(mine, source.to(torch.bfloat16).float())
    got, want = rounded_kn.logits(IDS).double(), rounded_plain.logits(IDS).double()
    assert nmse(want, got) <= FLOAT32
    assert nmse(kn.logits(IDS).double(), got) > 100 * FLOAT32  # precondition: rounding moved the logits


def test_eager_linear_on_a_layer_input_matches_f_linear(models):
    layer = models["kn"].layers[0]
    x = torch.randn(1, 4, layer.qkv.shape[1])
    assert nmse(F.linear(x, layer.qkv).double(), models["kn"].ops.linear(x, layer.qkv).double()) <= FLOAT32
