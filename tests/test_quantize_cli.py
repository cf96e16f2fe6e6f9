"""python -m model.quantize: each format's tensors against the formula written here, the written
checkpoint loads kept quantized to the logits of its own decoding, BitCPM4 ternary packs to the
logits of its dense fake-quantized form, and bad input is one line with exit 2 and no folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hal
from hal.ops import model_nmse_bound
from hal.errors import CheckpointError
from model.quantize import main
from model.synthetic import write_checkpoint

IDS = torch.tensor([[1, 5, 9, 200, 7, 300, 12, 1016, 44]])
LINEAR = "model.layers.1.mlp.down_proj"  # [128, 256]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("quantize") / "tiny", "tiny", seed=5, dtype="bfloat16")


@pytest.fixture(scope="module")
def written(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    runs = {"gptq-asym-v2": ["--format", "gptq-int4", "--asym", "--checkpoint-format", "gptq_v2", "--group-size", "64"],
            "gptq-sym": ["--format", "gptq-int4"], "int8": ["--format", "int8"],
            "int8-g32": ["--format", "int8", "--group-size", "32"], "ternary": ["--format", "ternary", "--group-size", "64"]}
    out = {}
    for name, args in runs.items():
        assert main([str(source), str(root / name)] + args) == 0
        out[name] = root / name
    return out


def _source_weight(source, name):
    return load_file(str(source / "model.safetensors"))[name + ".weight"].float()


def test_gptq_output_is_autogptq_and_round_to_nearest(source, written):
    config = json.loads((written["gptq-asym-v2"] / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": False,
                      "static_groups": False, "lm_head": False, "checkpoint_format": "gptq_v2"}
    t = load_file(str(written["gptq-asym-v2"] / "model.safetensors"))
    qweight = t[LINEAR + ".qweight"].numpy().view(np.uint32)  # [K/8, N]
    qzeros = t[LINEAR + ".qzeros"].numpy().view(np.uint32)  # [G, N/8]
    scales = t[LINEAR + ".scales"].float().numpy()  # [G, N]
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    q = np.stack([(qweight >> (4 * i)) & 15 for i in range(8)], axis=1).reshape(k, n).astype(np.float32)
    z = np.stack([(qzeros >> (4 * i)) & 15 for i in range(8)], axis=2).reshape(-1, n).astype(np.float32)
    g = np.arange(k) // 64
    src = _source_weight(source, LINEAR).numpy().T  # [K, N]
    # round to nearest with the stored (float16) scale and zero (gptq_v2: the stored zero is the zero)
    assert np.array_equal(q, np.clip(np.round(src / scales[g]) + z[g], 0, 15))
    assert len(np.unique(z)) > 1  # asymmetric: real zero points
    assert t[LINEAR + ".g_idx"].tolist() == g.tolist()


def test_int8_output_is_scale_times_q(source, written):
    t = load_file(str(written["int8-g32"] / "model.safetensors"))
    q, s = t[LINEAR + ".weight_int8"], t[LINEAR + ".weight_scale"]
    assert q.dtype == torch.int8 and s.shape == (128, 256 // 32)
    src = _source_weight(source, LINEAR)
    assert torch.allclose(s, src.reshape(128, 8, 32).abs().amax(-1) / 127)
    w = q.float().reshape(128, 8, 32) * s[..., None]
    assert bool(((w.reshape(128, 256) - src).abs() <= s.repeat_interleave(32, 1) / 2 + 1e-7).all())
    assert json.loads((written["int8"] / "config.json").read_text())["quantization_config"] == \
        {"quant_method": "hal_int8", "bits": 8, "group_size": -1}


def test_ternary_output_is_the_bitcpm_quantizer(source, written):
    got = load_file(str(written["ternary"] / "model.safetensors"))[LINEAR + ".weight"]
    assert got.dtype == torch.bfloat16
    src = _source_weight(source, LINEAR).reshape(128, 4, 64)
    s = src.abs().mean(-1, keepdim=True).clamp(min=1e-5).bfloat16().float()  # s = max(mean|W_g|, eps)
    want = (torch.clamp(torch.round(src / s), -1, 1) * s).reshape(128, 256)
    assert torch.equal(got.float(), want)
    assert "quantization_config" not in json.loads((written["ternary"] / "config.json").read_text())


@pytest.mark.parametrize("name", ["gptq-asym-v2", "gptq-sym", "int8", "int8-g32", "ternary"])
def test_written_checkpoint_kept_quantized_gives_its_decoded_logits(written, name):
    mode = "ternary" if name == "ternary" else None
    kept = hal.load_model(written[name], "cpu", "float32", quantize=mode)
    dense = hal.load_model(written[name], "cpu", "float32", quantize="dequantize")
    assert not isinstance(kept.layers[0].down, torch.Tensor) and isinstance(dense.layers[0].down, torch.Tensor)
    assert torch.equal(kept.logits(IDS), dense.logits(IDS))  # float32: bit for bit (ternary: the fake-quant model)


def test_packed_ternary_bytes(written):
    kept = hal.load_model(written["ternary"], "cpu", "bfloat16", quantize="ternary")
    down = kept.layers[0].down
    assert down.format == "bitcpm4 ternary g64" and kept.bound_ops["linear_ternary"] == "cpu.torch"
    dense_bytes = 128 * 256 * 2
    assert down.nbytes == 128 * 256 // 4 + 128 * 4 * 4  # 2 bits per weight + a float32 scale per group
    assert dense_bytes / down.nbytes == 6.4  # 8x less the scales' share at group 64 (7.9x per row of 256)
    # what the CPU kernel holds: codes t + 8 as int4 and a bfloat16 (scale, zero) per 64: 3.6x
    assert down.prepared_bytes == 128 * 256 // 2 + 128 * 4 * 2 * 2


def test_ternary_on_a_dense_checkpoint_names_the_tensor(source):
    with pytest.raises(CheckpointError, match=r"quantize='ternary': model\.layers\.0\.self_attn\.qkv_proj\.weight: "
                                              r"not a ternary weight"):
        hal.load_model(source, "cpu", "float32", quantize="ternary")


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "int3"], "--format must be one of gptq-int4, int8, ternary, got 'int3'"),
    (["--format", "int8", "--group-size", "48"], "--group-size 48 does not divide the input size 128"),
    (["--format", "gptq-int4", "--group-size", "0"], "--group-size must be -1"),
    (["--format", "gptq-int4", "--checkpoint-format", "marlin"], "--checkpoint-format must be gptq or gptq_v2"),
])
def test_bad_input_is_one_line_exit_2_and_no_folder(source, tmp_path, capsys, args, message):
    assert main([str(source), str(tmp_path / "out")] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert list(tmp_path.iterdir()) == []


def test_an_already_quantized_source_is_refused(written, tmp_path, capsys):
    assert main([str(written["int8"]), str(tmp_path / "again"), "--format", "gptq-int4"]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_packed_ternary_bfloat16_errs_like_its_dense_bfloat16(written):
    """Measured: per-row groups give bitwise the dense bfloat16 logits; groups of 64 NMSE 4e-6
    from them (the kernel sums per group). Bound: hal.ops.model_nmse_bound (~2x the dense
    bfloat16 error against float32)."""
    float32 = hal.load_model(written["ternary"], "cpu", "float32").logits(IDS)
    packed = hal.load_model(written["ternary"], "cpu", "bfloat16", quantize="ternary").logits(IDS)
    dense = hal.load_model(written["ternary"], "cpu", "bfloat16").logits(IDS)

    def nmse(x):
        return float((x - float32).pow(2).mean() / float32.pow(2).mean())

    assert nmse(packed) <= model_nmse_bound("bfloat16", nmse(dense)) and nmse(dense) < 1e-3
