"""GGUF Q4_0 / Q4_1 / Q8_0 linears kept quantized: each container decodes bit for bit as the
``gguf`` package's numpy ``gguf.quants.dequantize`` (random block bytes, so every float16 scale
class appears: zero, -0, subnormal, max, inf, NaN; a NaN result matches as NaN, its payload is the
CPU's operand order's, and loading refuses non-finite scales anyway), and a model loaded kept quantized gives the
logits of the same file decoded at load (float32: equal; bfloat16: no worse than dense bfloat16)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import hal
from hal.ops import model_nmse_bound
from hal import quant
from model.gguf_quant import container
from model.synthetic import write_checkpoint
from llamacpp_convert import MIXED_LINEAR_TYPES, tensor_types, write_minicpm_gguf

IDS = torch.tensor([[1, 5, 9, 200, 7, 300, 12, 1016, 44, 3, 77]])
EDGE_SCALES = np.array([0x0000, 0x8000, 0x0001, 0x83FF, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0x3C00],
                       dtype=np.uint16)
"""float16 bit patterns: 0, -0, smallest subnormal, largest negative subnormal, ±max, ±inf, NaN, 1."""


def _random_blocks(kind: gguf.GGMLQuantizationType, rows: int, k: int, seed: int) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, k // block, size), dtype=np.uint8)
    halves = 2 if kind == gguf.GGMLQuantizationType.Q4_1 else 1  # d (and m) float16 first
    for h in range(halves):
        pick = rng.integers(0, len(EDGE_SCALES), size=(rows, k // block))
        edge = rng.random((rows, k // block)) < 0.3
        bits = raw[..., 2 * h:2 * h + 2].copy().view(np.uint16)[..., 0]
        bits = np.where(edge, EDGE_SCALES[pick], bits)
        raw[..., 2 * h:2 * h + 2] = bits.astype(np.uint16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_container_decodes_bitwise_as_the_gguf_package(kind):
    qtype = gguf.GGMLQuantizationType[kind]
    rows, k = 96, 256  # 768 blocks
    blocks = _random_blocks(qtype, rows, k, seed=len(kind) + qtype.value)
    want = gguf.quants.dequantize(blocks, qtype).reshape(rows, k)
    got = container("test.gguf", "blk.0.attn_q.weight", kind, blocks, (rows, k))
    assert got.source == kind.lower() and got.group_size == 32
    got = got.dequantize().numpy()
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan) and 0 < nan.sum() < nan.size
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_quantized_real_weights_decode_bitwise_too():
    w = np.random.default_rng(3).standard_normal((48, 128)).astype(np.float32)
    w[0, :32] = 0.0
    w[1, :32] = 7.5e-8  # a subnormal float16 scale
    for kind in ("Q4_0", "Q4_1", "Q8_0"):
        qtype = gguf.GGMLQuantizationType[kind]
        blocks = gguf.quants.quantize(w, qtype)
        got = container("t", "t", kind, blocks, w.shape).dequantize().numpy()
        assert np.array_equal(got.view(np.uint32), gguf.quants.dequantize(blocks, qtype).view(np.uint32))


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("qgguf") / "tiny", "tiny", seed=2, dtype="float32")


@pytest.fixture(scope="module")
def mixed_gguf(tiny_f32, tmp_path_factory):
    return write_minicpm_gguf(tiny_f32, tmp_path_factory.mktemp("qgguf") / "mixed.gguf",
                              tensor_type=tensor_types(MIXED_LINEAR_TYPES))


def test_kept_linears_are_containers_and_float32_logits_equal_the_decoded_file(mixed_gguf):
    kept = hal.load_model(mixed_gguf, "cpu", "float32")
    dense = hal.load_model(mixed_gguf, "cpu", "float32", quantize="dequantize")
    layer = kept.layers[0]
    assert (layer.qkv.format, layer.o.format, layer.gate_up.format, layer.down.format) == \
        ("q4_0 int4 g32", "q8_0 int8 g32", "q4_1 int4 g32", "q4_0 int4 g32")
    assert isinstance(dense.layers[0].qkv, torch.Tensor)
    assert isinstance(kept.embed, torch.Tensor) and kept.lm_head is kept.embed  # dense, tied
    # float32 binds the exact decoding (cpu.dequant): q/k rows unpermuted exactly as the dense path
    assert torch.equal(kept.logits(IDS), dense.logits(IDS))


def test_bfloat16_packed_kernels_err_like_dense_bfloat16(mixed_gguf):
    """The packed kernels round each group's scale and zero to bfloat16 (two roundings of the
    same size as the dense weight's one, the activation and output roundings shared), so their
    error against the float32 decoding is at most ~2x dense bfloat16's (measured on this tiny
    model: 1.9e-4 vs 1.6e-4; on SmolLM2 Q4_1: 4.6e-4 vs 1.6e-3)."""
    reference = hal.load_model(mixed_gguf, "cpu", "float32", reference=True).logits(IDS)
    packed = hal.load_model(mixed_gguf, "cpu", "bfloat16")
    assert packed.bound_ops["linear_int4"] == "cpu.torch" and packed.bound_ops["linear_int8"] == "cpu.torch"
    dense = hal.load_model(mixed_gguf, "cpu", "bfloat16", quantize="dequantize").logits(IDS)

    def nmse(x):
        return float((x - reference).pow(2).mean() / reference.pow(2).mean())

    assert nmse(packed.logits(IDS)) <= model_nmse_bound("bfloat16", nmse(dense))
    assert nmse(dense) < 1e-3  # the bound means something: bfloat16 noise, not garbage


def test_a_fused_group_of_mixed_types_is_decoded_dense(tiny_f32, tmp_path):
    path = write_minicpm_gguf(tiny_f32, tmp_path / "m.gguf", tensor_type=tensor_types({"attn_q": "Q4_0", "attn_k": "Q8_0",
                                                                                "attn_v": "Q4_0"}))
    kept = hal.load_model(path, "cpu", "float32")
    assert isinstance(kept.layers[0].qkv, torch.Tensor)
    assert torch.equal(kept.logits(IDS), hal.load_model(path, "cpu", "float32", quantize="dequantize").logits(IDS))
    assert kept.decoded_at_load == {f"model.layers.{i}.self_attn.qkv_proj.weight": "its parts mix q4_0 int4 g32 and "
                                    "q8_0 int8 g32" for i in range(kept.config.num_hidden_layers)}


def test_other_types_are_decoded_at_load_and_named(tiny_f32, tmp_path):
    """Q5_0 / Q5_1 linears (not in model.gguf_quant.KEPT) are decoded at load as the gguf package
    decodes them (the logits equal the dequantizing load's), and the model names each with its type;
    a fused group with one such part is named with the part's reason. F32 linears are not named."""
    path = write_minicpm_gguf(tiny_f32, tmp_path / "m.gguf", tensor_type=tensor_types(
        {"attn_q": "Q4_0", "attn_k": "Q5_0", "attn_v": "Q4_0", "attn_output": "Q4_0", "ffn_down": "Q5_1"}))
    kept = hal.load_model(path, "cpu", "float32")
    assert torch.equal(kept.logits(IDS), hal.load_model(path, "cpu", "float32", quantize="dequantize").logits(IDS))
    layers = kept.config.num_hidden_layers
    assert kept.layers[0].o.format == "q4_0 int4 g32"
    assert isinstance(kept.layers[0].gate_up, torch.Tensor)  # F32 in the file: not a quantized linear
    want = {}
    for i in range(layers):
        want[f"model.layers.{i}.self_attn.qkv_proj.weight"] = "GGUF Q5_0 is decoded at load (kept quantized: Q4_0, Q4_1, Q8_0)"
        want[f"model.layers.{i}.mlp.down_proj.weight"] = "GGUF Q5_1 is decoded at load (kept quantized: Q4_0, Q4_1, Q8_0)"
    assert kept.decoded_at_load == want


def test_permuted_rows_move_their_blocks():
    from model.gguf_checkpoint import permute_rows, unpermute_rows

    w = torch.randn(64, 64)
    blocks = gguf.quants.quantize(permute_rows(w, 4).numpy(), gguf.GGMLQuantizationType.Q4_1)
    c = container("t", "t", "Q4_1", blocks, (64, 64))
    dense = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1).copy())
    assert torch.equal(c.map_rows(lambda t: unpermute_rows(t, 4)).dequantize(), unpermute_rows(dense, 4))
    assert isinstance(c, quant.Int4Weight)


def test_unknown_quantize_mode_is_one_line(mixed_gguf):
    from hal.errors import InputError

    with pytest.raises(InputError, match="quantize must be one of keep, dequantize, ternary"):
        hal.load_model(mixed_gguf, "cpu", "float32", quantize="int3")


def test_a_token_table_in_another_type_is_named_on_the_embedding_row(tiny_f32, tmp_path):
    from validation import quantization

    def tensor_type(name):
        return gguf.GGMLQuantizationType.Q5_0 if name.startswith("token_embd") else tensor_types({"attn_q": "Q4_0"})(name)

    kept = hal.load_model(write_minicpm_gguf(tiny_f32, tmp_path / "m.gguf", tensor_type=tensor_type), "cpu", "bfloat16")
    why = "GGUF Q5_0 is decoded at load (kept quantized: Q4_0, Q4_1, Q8_0)"
    assert kept.decoded_at_load["model.embed_tokens.weight"] == why
    section = quantization.describe(kept)
    assert section["embedding"]["decoded_at_load"] == why
    assert f"| embedding (tied lm_head) | dense bfloat16 (decoded at load: {why}) |" in "\n".join(quantization.markdown(section))


def test_linears_packed_ternary_after_their_decode_are_not_named(tiny_f32, tmp_path):
    """quantize="ternary" packs what the load decoded (here llama.cpp's ternary TQ2_0 down_proj: its
    values are {-s, 0, +s} per 256-block row): those linears are held quantized after all."""
    types = tensor_types({"attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q4_0", "attn_output": "Q4_0",
                    "ffn_gate": "Q4_0", "ffn_up": "Q4_0", "ffn_down": "TQ2_0"})
    path = write_minicpm_gguf(tiny_f32, tmp_path / "t.gguf", tensor_type=types)
    assert "model.layers.0.mlp.down_proj.weight" in hal.load_model(path, "cpu", "bfloat16").decoded_at_load
    packed = hal.load_model(path, "cpu", "bfloat16", quantize="ternary")
    assert packed.layers[0].down.format.split()[1] == "ternary"
    assert packed.decoded_at_load == {}
