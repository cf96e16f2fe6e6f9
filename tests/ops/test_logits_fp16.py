"""cpu.fbgemm logits (backends/cpu/logits_fp16.py) beyond the conformance grid (tests/ops/test_logits.py
runs it there against the float32 reference): the packed float16 copy holds the bfloat16 / float16
lm_head exactly, read back through fbgemm's own unpack; a weight float16 cannot hold is refused at
prepare with the reason and served by the exact chunked path; a model holds the packed lm_head,
counts its bytes, and passes the dense tensor to any other logits implementation."""
from __future__ import annotations

import copy

import pytest
import torch

import hal
from backends.cpu import logits_fp16 as f16
from backends.cpu.ops import logits_cpu
from backends.cpu.reference.linear import logits_ref
from hal.ops import get_spec
from hal.registry import BindContext, bind
from model.tp import weight_bytes
from validation import quantization
from validation.grid import grid
from validation.opcheck import make_inputs, nmse

pytestmark = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                reason="torch built without fbgemm")


def _grid_weight(flags: tuple[str, ...], dtype: torch.dtype) -> torch.Tensor:
    """The lm_head of the grid's logits case with these flags, in ``dtype`` (the grid's own inputs)."""
    c = next(c for c in grid("logits", ["bfloat16"]) if c.flags == flags)
    return make_inputs(c)["weight"].to(dtype)


def _held(prepared: f16.Fp16Packed) -> torch.Tensor:
    """What fbgemm's packed copy holds, unscaled, in float64 (through fbgemm's own unpack)."""
    return torch.ops.quantized.linear_unpack_fp16(prepared.packed)[0].double() * 2.0 ** -prepared.shift


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("flags", [(), ("tiny",)], ids=["normal", "tiny"])
def test_packed_copy_holds_the_weight_exactly(flags, dtype):
    weight = _grid_weight(flags, dtype)
    assert weight.abs().max() > 0
    prepared = f16.prepare_logits_fp16(weight)
    assert isinstance(prepared, f16.Fp16Packed), getattr(prepared, "reason", "")
    assert torch.equal(_held(prepared), weight.double())
    top = float(weight.abs().max()) * 2.0 ** prepared.shift
    assert 2.0 ** 15 <= top < 2.0 ** 16  # the largest magnitude sits in float16's top binade
    if flags == ("tiny",) and dtype == torch.bfloat16:
        # precondition: unscaled, float16 would lose most of this weight (its values sit below 2^-14)
        assert int((weight.float().half().float() != weight.float()).sum()) > weight.numel() // 2


def test_wide_weight_is_refused_and_served_exactly():
    weight = _grid_weight(("wide",), torch.bfloat16)
    prepared = f16.prepare_logits_fp16(weight)
    assert isinstance(prepared, f16.Fp16Refused)
    assert "would round in float16" in prepared.reason and prepared.nbytes == 0
    # precondition: packed anyway at the best scale, the float16 copy loses values
    shift = f16.fp16_shift(weight)
    forced = torch.ops.quantized.linear_prepack_fp16(weight.float() * 2.0 ** shift, None)
    held = torch.ops.quantized.linear_unpack_fp16(forced)[0].double() * 2.0 ** -shift
    assert not torch.equal(held, weight.double())
    x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(1)).bfloat16()
    assert torch.equal(f16.logits_fp16(x, prepared), logits_cpu(x, weight))


def test_supports_names_float32_and_a_missing_fbgemm(monkeypatch):
    assert f16.supports(BindContext("cpu", torch.bfloat16)) is None
    assert "dtype must be bfloat16 or float16" in f16.supports(BindContext("cpu", torch.float32))
    monkeypatch.setattr(f16, "quantized_engines", lambda: ["qnnpack"])
    assert "must include fbgemm, got ['qnnpack']" in f16.supports(BindContext("cpu", torch.bfloat16))


@pytest.fixture(scope="module")
def bf16_model(tiny_checkpoint):
    return hal.load_model(tiny_checkpoint, "cpu", "bfloat16")


def test_model_holds_the_packed_lm_head_and_counts_it(bf16_model):
    model = bf16_model
    assert model.bound_ops["logits"] == "cpu.fbgemm"
    assert isinstance(model.head.weight, f16.Fp16Packed) and model.head.source is model.lm_head
    vocab, width = model.lm_head.shape
    assert model.head.prepared_bytes == vocab * width * 2
    dense = {id(t): t.numel() * t.element_size() for t in [model.embed, model.lm_head, model.final_norm]
             + [t for layer in model.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]}
    assert weight_bytes(model) == sum(dense.values()) + vocab * width * 2
    section = quantization.describe(model)
    assert section["lm_head"]["impl"] == "cpu.fbgemm" and section["weight_bytes"]["lm_head_prepared"] == vocab * width * 2


def test_model_logits_match_the_reference_on_the_same_hidden_state(bf16_model, monkeypatch):
    """The float32 reference through the same model (an override: the model must hand it the dense
    lm_head, not the packed copy) against the packed path, within the catalogue bound."""
    model = bf16_model
    ids = torch.tensor([[1, 5, 9, 200, 3, 77, 401]])
    received = []
    real = model.ops.logits

    def spy(x, weight):
        received.append(type(weight))
        return real(x, weight)

    monkeypatch.setattr(model.ops, "logits", spy)
    got = model.logits(ids)
    assert received == [f16.Fp16Packed]  # precondition: these logits came from the packed copy
    ops = bind("cpu", torch.bfloat16, model.config.shapes(), overrides={"logits": logits_ref})
    reference = copy.copy(model)
    reference.ops = ops
    assert reference.head_weight(ops) is model.lm_head
    want = reference.logits(ids)
    assert nmse(want, got) <= get_spec("logits").tolerance("bfloat16")


def test_a_copy_with_other_weights_never_reads_the_stale_packed_copy(bf16_model):
    halved = copy.copy(bf16_model)
    halved.lm_head = bf16_model.lm_head * 0.5  # exact in bfloat16; the embedding (and so x) is unchanged
    assert halved.head_weight(halved.ops) is halved.lm_head
    ids = torch.tensor([[4, 8, 15, 16]])
    # the stale packed copy would give twice these logits (NMSE 1)
    assert nmse(0.5 * bf16_model.logits(ids), halved.logits(ids)) <= get_spec("logits").tolerance("bfloat16")
