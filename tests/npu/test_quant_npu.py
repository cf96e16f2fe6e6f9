"""Weight-only quantized linears on the emulated NPU: the emulator's ``npu_weight_quant_batchmatmul``
and ``npu_convert_weight_to_int4pack`` against hand-computed values and their documented input
rules, and the wrappers (backends/npu/quant_linear.py) against the catalogue's float32 reference
for every source format, including the sign of a GPTQ zero point."""
from __future__ import annotations

import pytest
import torch

from backends.npu import quant_linear as nq
from backends.npu.emulator import quant_matmul as em
from backends.npu.emulator.checks import EmulatedOpError, NotEmulatedError
from backends.npu.supports import weight_quant
from hal import quant
from hal.errors import UnsupportedOpError
from hal.registry import BindContext, bind
from validation.opcheck import case, check, random_container

BF16, F16 = torch.bfloat16, torch.float16


# -- the emulated ops ------------------------------------------------------------------------------

def test_int4pack_puts_element_8j_plus_i_in_nibble_i_of_word_j():
    w = torch.tensor([[1, 2, 3, 4, 5, 6, 7, -8, 0, 0, 0, 0, 0, 0, 0, -1]], dtype=torch.int32)
    packed = em.npu_convert_weight_to_int4pack(w)
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    assert packed[0, 0].item() == 0x87654321 - 2 ** 32  # hand-computed: -8 is nibble 0x8, the top one
    assert packed[0, 1].item() == 0xF0000000 - 2 ** 32  # -1 is 0xF in the last nibble
    assert torch.equal(em.unpack_int4pack(packed), w)


@pytest.mark.parametrize(("weight", "message"), [
    (torch.zeros(4, 12, dtype=torch.int32), "the last dim of weight must be a multiple of 8, got 12"),
    (torch.full((4, 8), 8, dtype=torch.int32), r"weight values must lie in the int4 range \[-8, 7\]"),
    (torch.zeros(8, 8, dtype=torch.int8), r"weight dtype must be one of \(int32\), got int8"),
    (torch.zeros(16, 8, dtype=torch.int32).t(), "weight must be contiguous"),
])
def test_int4pack_refuses_what_the_card_refuses(weight, message):
    with pytest.raises(EmulatedOpError, match=message):
        em.npu_convert_weight_to_int4pack(weight)


def _golden(x, values, scale_kn, offset_kn=None):
    """This test's reference: the documented formula in float64 on (K, N) expanded tensors."""
    w = values.double() + (0 if offset_kn is None else offset_kn.double())
    return x.double() @ (w * scale_kn.double())


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_per_channel_per_group_and_per_tensor_follow_the_documented_formula(dtype):
    g = torch.Generator().manual_seed(0)
    m, k, n, group = 3, 96, 16, 32
    x = torch.randn(m, k, generator=g).to(dtype)
    values = torch.randint(-8, 8, (k, n), generator=g, dtype=torch.int32)
    packed = em.npu_convert_weight_to_int4pack(values)
    int8 = torch.randint(-127, 128, (k, n), generator=g).to(torch.int8)
    scale_g = (torch.rand(k // group, n, generator=g) * 0.05).to(dtype)
    offset_g = torch.randint(-4, 4, (k // group, n), generator=g).to(dtype)
    scale_c = (torch.rand(n, generator=g) * 0.05).to(dtype)
    scale_t = torch.tensor([0.03], dtype=dtype)
    cases = [
        (em.npu_weight_quant_batchmatmul(x, packed, scale_g, offset_g, antiquant_group_size=group),
         _golden(x, values, scale_g.repeat_interleave(group, 0), offset_g.repeat_interleave(group, 0))),
        (em.npu_weight_quant_batchmatmul(x, int8, scale_c), _golden(x, int8, scale_c.expand(k, n))),
        (em.npu_weight_quant_batchmatmul(x, int8, scale_t), _golden(x, int8, scale_t.expand(k, n))),
    ]
    for y, ref in cases:
        assert y.dtype == dtype and y.shape == (m, n)
        nmse = float(((y.double() - ref) ** 2).sum() / (ref ** 2).sum())
        assert nmse < (1e-4 if dtype == BF16 else 2e-6), nmse


def test_a_packed_k_by_n8_and_a_transposed_n_by_k8_weight_give_the_same_product():
    g = torch.Generator().manual_seed(1)
    values = torch.randint(-8, 8, (64, 16), generator=g, dtype=torch.int32)  # (K, N)
    x = torch.randn(2, 64, generator=g).to(F16)
    scale = torch.full((16,), 0.01, dtype=F16)
    along_n = em.npu_convert_weight_to_int4pack(values)                       # (K, N/8)
    along_k = em.npu_convert_weight_to_int4pack(values.t().contiguous()).t()  # (K/8, N) view
    assert torch.equal(em.npu_weight_quant_batchmatmul(x, along_n, scale),
                       em.npu_weight_quant_batchmatmul(x, along_k, scale))


def _call(**overrides):
    g = torch.Generator().manual_seed(2)
    args = dict(x=torch.randn(2, 64, generator=g).to(BF16), weight=torch.zeros(64, 16, dtype=torch.int8),
                antiquant_scale=torch.ones(2, 16, dtype=BF16), antiquant_group_size=32)
    args.update(overrides)
    return em.npu_weight_quant_batchmatmul(**args)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(x=torch.zeros(2, 64)), r"x dtype must be one of \(float16, bfloat16\), got float32"),
    (dict(x=torch.zeros(1, 2, 64, dtype=BF16)), r"x must have 2 dims \(M, K\), got 3"),
    (dict(antiquant_scale=torch.ones(2, 16)), r"antiquant_scale dtype must equal x's \(bfloat16\), got float32"),
    (dict(antiquant_scale=torch.ones(4, 16, dtype=BF16), antiquant_group_size=16),
     r"antiquant_group_size must be in \[32, K-1\] = \[32, 63\] and a multiple of 32 .*got 16"),
    (dict(antiquant_scale=torch.ones(1, 8, dtype=BF16)),
     r"antiquant_scale must be .*got \[1, 8\]"),
    (dict(antiquant_offset=torch.ones(1, 16, dtype=BF16)), r"antiquant_offset shape must equal antiquant_scale's"),
    (dict(antiquant_offset=torch.ones(2, 16, dtype=F16)), "antiquant_offset dtype must equal antiquant_scale's"),
    (dict(bias=torch.zeros(16, dtype=BF16)), "bias must be float32 for bfloat16 x, got bfloat16"),
    (dict(weight=torch.zeros(32, 16, dtype=torch.int8)), "weight K 32 must equal x's K 64"),
    (dict(x=torch.zeros(1, 65536, dtype=BF16), weight=torch.zeros(65536, 8, dtype=torch.int8),
          antiquant_scale=torch.ones(8, dtype=BF16), antiquant_group_size=0),
     r"K and N must be in \[1, 65535\], got K=65536"),
])
def test_the_documented_input_rules_are_enforced(overrides, message):
    with pytest.raises(EmulatedOpError, match=message):
        _call(**overrides)


def test_options_the_emulator_does_not_model_say_so():
    with pytest.raises(NotEmulatedError, match="output quantization"):
        _call(quant_scale=torch.ones(16))
    with pytest.raises(NotEmulatedError, match="int64 antiquant_scale"):
        _call(antiquant_scale=torch.ones(2, 16, dtype=torch.int64))


def test_a_float32_bias_is_added_for_bfloat16_x():
    bias = torch.arange(16, dtype=torch.float32)
    y = _call(bias=bias)  # zero weight: y is the bias itself
    assert torch.equal(y, bias.to(BF16).expand(2, 16))


# -- the wrappers against the float32 reference ----------------------------------------------------

FORMATS = [  # (op, source, group size)
    ("linear_int4", "q4_0", 32), ("linear_int4", "q4_1", 32), ("linear_int4", "gptq", 64),
    ("linear_int8", "q8_0", 32), ("linear_int8", "rtn", 128),  # K = 128: per output channel
    ("linear_ternary", "rtn", 64), ("linear_ternary", "bitcpm4", 128),
]
PREPARE = {"linear_int4": (nq.prepare_weight_quant, nq.linear_weight_quant_npu),
           "linear_int8": (nq.prepare_weight_quant, nq.linear_weight_quant_npu),
           "linear_ternary": (nq.prepare_packed_ternary, nq.linear_ternary_npu)}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("rows", [1, 19])
@pytest.mark.parametrize(("op", "source", "group"), FORMATS)
def test_every_format_matches_the_float32_reference(emulated, op, source, group, rows, dtype):
    prepare, fn = PREPARE[op]
    c = case(op, dtype, (source,), B=1, T=rows, K=128, O=96, G=group)
    result = check(c, fn, "npu", "npu", prepare=prepare)
    assert result.status == "ok", result.line()


def _gptq(zeros_value: torch.Tensor | None, g: torch.Generator) -> quant.Int4Weight:
    """A GPTQ layer as the loader builds it: codes, float16 scales, zeros = the effective zero point
    (stored + 1 for gptq v1); ``zeros_value`` None: asymmetric, random zeros per group."""
    out, k, group = 64, 128, 32
    zeros = torch.randint(3, 13, (out, k // group), generator=g).float() if zeros_value is None else zeros_value
    return quant.Int4Weight(name="model.layers.0.self_attn.q_proj", source="gptq", out_features=out, in_features=k,
                            group_size=group, scales=(torch.rand(out, k // group, generator=g) * 0.02).half().float(),
                            packed=quant.pack_int4(torch.randint(0, 16, (out, k), generator=g)), zeros=zeros)


def _vllm_ascend_offset(weight, ctx):
    """vllm-ascend's GPTQ path: the zeros shifted by -8 like the weights, passed un-negated."""
    p = nq.prepare_weight_quant(weight, ctx)
    offset = (weight.zeros - 8).t().contiguous().to(ctx.dtype)
    return nq.WeightQuantLinear(**{**p.__dict__, "offset": offset})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_an_asymmetric_gptq_zero_must_be_negated(emulated, dtype, monkeypatch):
    g = torch.Generator().manual_seed(7)
    weight = _gptq(None, g)
    monkeypatch.setattr("validation.opcheck.random_container", lambda *a, **k: weight)
    c = case("linear_int4", dtype, ("gptq",), B=1, T=4, K=128, O=64, G=32)
    ours = check(c, nq.linear_weight_quant_npu, "npu", "npu", prepare=nq.prepare_weight_quant)
    theirs = check(c, nq.linear_weight_quant_npu, "npu", "npu", prepare=_vllm_ascend_offset)
    assert ours.status == "ok", ours.line()
    assert theirs.status == "FAIL", theirs.line()


def test_a_symmetric_gptq_zero_gives_offset_zero_either_way(emulated, monkeypatch):
    """z = 8 everywhere (v1 stores 7, +1; v2 stores 8): -(z - 8) and z - 8 are both 0, so the
    un-negated form is right by accident here, and the op is called with no offset at all."""
    g = torch.Generator().manual_seed(8)
    weight = _gptq(torch.full((64, 4), 8.0), g)
    ctx = BindContext("npu", BF16)
    assert nq.prepare_weight_quant(weight, ctx).offset is None
    monkeypatch.setattr("validation.opcheck.random_container", lambda *a, **k: weight)
    c = case("linear_int4", "bfloat16", ("gptq",), B=1, T=4, K=128, O=64, G=32)
    for prepare in (nq.prepare_weight_quant, _vllm_ascend_offset):
        assert check(c, nq.linear_weight_quant_npu, "npu", "npu", prepare=prepare).status == "ok"


def test_q4_1_mins_become_the_offset_8_plus_m_over_s():
    g = torch.Generator().manual_seed(9)
    w = random_container(g, "linear_int4", "q4_1", 16, 64, 32)
    offset = nq.antiquant_offset(w)
    q = w.values().float() - 8  # the signed values the op sees
    decoded = (q + offset.repeat_interleave(32, 1)) * w.scales.repeat_interleave(32, 1)
    assert torch.allclose(decoded, w.dequantize(), rtol=0, atol=1e-6)  # float32: m / s rounds once


def test_what_the_op_refuses_is_refused_at_prepare_with_the_tensor_name(emulated):
    g = torch.Generator().manual_seed(3)
    ctx = BindContext("npu", BF16)
    with pytest.raises(UnsupportedOpError, match=r"npu.linear_int8: group_size must be K .* got 16 for K=64 "
                                                 r"\(grid.linear_int8\)"):
        nq.prepare_weight_quant(random_container(g, "linear_int8", "rtn", 8, 64, 16), ctx)
    p = nq.prepare_weight_quant(random_container(g, "linear_int4", "gptq", 16, 64, 32), ctx)
    assert p.nbytes == 64 * 16 // 2 + 2 * (2 * 16 * 2)  # int4 codes + bf16 scale and offset (G=2, N=16)
    with pytest.raises(UnsupportedOpError, match=r"out_features must be a multiple of 8 .*got 12"):
        nq.prepare_weight_quant(random_container(g, "linear_int4", "q4_0", 12, 64, 32), ctx)
    with pytest.raises(UnsupportedOpError, match="dtype must be bfloat16 or float16"):
        nq.prepare_weight_quant(random_container(g, "linear_int4", "q4_0", 16, 64, 32), BindContext("npu", torch.float32))


def test_npu_binds_the_fused_op_for_bf16_and_the_dense_decoding_for_float32():
    shapes = {"E": 256, "F": 512, "G": 128}
    ops = bind("npu", BF16, shapes)
    assert ops.record["linear_int4"].impl == "npu.torch_npu"
    assert ops.record["linear_int8"].impl == "npu.torch_npu"
    assert ops.record["linear_ternary"].impl == "npu.torch_unpack"
    f32 = bind("npu", torch.float32, shapes).record["linear_int4"]
    assert f32.impl == "npu.dequant"
    assert f32.passed_over[0][1].startswith("npu.linear_int4: dtype must be bfloat16 or float16")
    assert weight_quant("linear_int4")(BindContext("npu", BF16, {"E": 256, "G": 48})).endswith("got 48")
    assert weight_quant("linear_int8")(BindContext("npu", BF16, {"E": 256, "G": 256})) is None  # per channel


def test_ternary_stays_packed_on_the_device_until_the_call(emulated):
    g = torch.Generator().manual_seed(4)
    w = random_container(g, "linear_ternary", "rtn", 32, 64, 32)
    p = nq.prepare_packed_ternary(w, BindContext("npu", BF16))
    assert p.packed.dtype == torch.uint8 and tuple(p.packed.shape) == (32, 16)  # 2 bits per weight at rest
    assert p.nbytes == 32 * 16 + 32 * 2 * 4  # codes + float32 scales
    unpacked = nq.unpack_ternary_on_device(p, BF16)
    assert torch.equal(unpacked, w.dequantize().to(BF16))  # s * t is exact, then rounded once


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("rows", [1, 19])
def test_the_trained_models_q4_1_and_q8_0_tensors_match_the_float32_reference(emulated, trained_gguf, dtype, rows):
    """Real scales and mins (a trained model's Q4_1 blocks: offsets 8 + m / s and scales rounded to
    x's dtype by the op's contract) within the catalogue tolerance of the op."""
    from hal.ops import get_spec
    from quant_trained_weights import activations, trained_containers

    name = {BF16: "bfloat16", F16: "float16"}[dtype]
    for w in trained_containers(str(trained_gguf)):
        x = activations(w.in_features, rows).to(dtype)
        y = nq.linear_weight_quant_npu(x, nq.prepare_weight_quant(w, BindContext("npu", dtype)))
        ref = x.double() @ w.dequantize().double().t()
        err = float(((y.double() - ref) ** 2).sum() / (ref ** 2).sum())
        assert err <= get_spec(w.op).tolerance(name), f"{w.name} {w.format} {name}: NMSE {err:.2e}"
