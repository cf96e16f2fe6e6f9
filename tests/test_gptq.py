"""GPTQ int4 checkpoints: unpacking against hand-packed words, and a GPTQ checkpoint's logits
against a float checkpoint holding the same fake-quantized weights (computed here, from the
float checkpoint of the same seed, with the symmetric 4-bit formula)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import hal
from hal.errors import ConfigError
from model.config import parse_config
from model.gptq import dequantize, unpack_cols, unpack_rows
from model.synthetic import GPTQ_CONFIG, _config, write_checkpoint


def test_unpacking_reads_nibbles_low_first():
    # one int32 word holding nibbles 1..8 from the lowest: 0x87654321
    word = torch.tensor([[0x87654321 - 2 ** 32]], dtype=torch.int32)
    assert unpack_rows(word)[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]  # along K
    assert unpack_cols(word)[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]  # along N


def test_dequantize_follows_the_gptq_formula():
    # K = 8 inputs, N = 8 outputs, one group; q[k, n] = k, stored zero 7 (+1 offset = 8), scale n + 1
    qweight = torch.tensor([[0x76543210] * 8], dtype=torch.int32)
    qzeros = torch.tensor([[0x77777777]], dtype=torch.int32)
    scales = torch.arange(1, 9, dtype=torch.float16)[None]
    w = dequantize(qweight, qzeros, scales, torch.zeros(8, dtype=torch.int32), offset=1)  # [N, K]
    expected = torch.tensor([[(k - 8) * (n + 1) for k in range(8)] for n in range(8)], dtype=torch.float32)
    assert torch.equal(w, expected)


def test_a_gptq_checkpoint_runs_its_dequantized_weights(tmp_path):
    quantized = write_checkpoint(tmp_path / "gptq", "tiny", seed=4, dtype="float32", quantize_gptq=True)
    plain = write_checkpoint(tmp_path / "plain", "tiny", seed=4, dtype="float32")
    weights = load_file(str(plain / "model.safetensors"))
    for name, w in weights.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            groups = w.t().reshape(-1, 128, w.shape[0])  # [G, 128, N]: groups along the input dim
            scale = groups.abs().amax(dim=1, keepdim=True) / 7
            q = torch.clamp(torch.round(groups / scale), -8, 7)
            weights[name] = (q * scale.half().float()).reshape(-1, w.shape[0]).t().contiguous()
    fake = tmp_path / "fake"
    shutil.copytree(plain, fake)
    save_file(weights, str(fake / "model.safetensors"))
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3]])
    got = hal.load_model(quantized, "cpu", "float32").logits(ids)
    want = hal.load_model(fake, "cpu", "float32").logits(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert json.loads((quantized / "config.json").read_text())["quantization_config"]["bits"] == 4


@pytest.mark.parametrize(("field", "value", "message"), [
    ("bits", 8, "'quantization_config.bits' must be 4"),
    ("quant_method", "awq", "must be 'gptq'"),
    ("lm_head", True, "quantized lm_head"),
    ("group_size", 96, "must divide every linear's input size"),
    ("checkpoint_format", "marlin", "must be 'gptq' or 'gptq_v2'"),
])
def test_bad_quantization_config_names_the_field(field, value, message):
    data = _config("tiny")
    data["quantization_config"] = dict(GPTQ_CONFIG, **{field: value})
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_zero_offset_follows_the_checkpoint_format():
    # AutoGPTQ: format "gptq" stores zero - 1 (research/minicpm4_spec.md §6.2), "gptq_v2" the zero itself
    for form, offset in (("gptq", 1), ("gptq_v2", 0)):
        data = _config("tiny")
        data["quantization_config"] = dict(GPTQ_CONFIG, checkpoint_format=form)
        assert parse_config(data).gptq.zero_offset == offset


def test_gptq_tensors_without_quantization_config_are_named(tmp_path):
    from hal.errors import CheckpointError

    path = write_checkpoint(tmp_path / "gptq", "tiny", quantize_gptq=True)
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.down_proj.qweight' is GPTQ-packed but config.json "
                                              "has no quantization_config"):
        hal.load_model(path, "cpu", "float32")


def test_out_of_range_g_idx_is_refused_in_one_line(tmp_path):
    from hal.errors import CheckpointError

    path = write_checkpoint(tmp_path / "gptq", "tiny", quantize_gptq=True, dtype="float32")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.g_idx"][3] = -1
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.q_proj.g_idx' holds groups outside \[0, 1\)"):
        hal.load_model(path, "cpu", "float32")


def test_group_size_zero_and_per_column_groups(tmp_path):
    data = _config("tiny")
    data["quantization_config"] = dict(GPTQ_CONFIG, group_size=0)
    with pytest.raises(ConfigError, match="must be -1 .* or > 0, got 0"):
        parse_config(data)
    per_column = dict(GPTQ_CONFIG, group_size=-1)
    path = write_checkpoint(tmp_path / "g", "tiny", quantize_gptq=True, overrides={"quantization_config": per_column})
    model = hal.load_model(path, "cpu", "float32")
    assert model.config.gptq.group_size == -1 and torch.isfinite(model.logits(torch.tensor([[5, 6, 7]]))).all()
