"""GPTQ with several groups and a different zero point in every (group, column): model/gptq.py's
dequantize and the checkpoint loader against a decoding written here in numpy from the AutoGPTQ
layout (research/minicpm4_spec.md §6.2; model/gptq.py's docstring):

    q[k, n] = (qweight[k // 8, n] >> 4 (k % 8)) & 0xF        (packed along the input dim)
    z[g, n] = (qzeros[g, n // 8] >> 4 (n % 8)) & 0xF          (packed along the output dim)
    w[n, k] = scales[g, n] * (q[k, n] - (z[g, n] + offset)),  g = g_idx[k]
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import hal
from model.gptq import dequantize
from model.synthetic import GPTQ_CONFIG, write_checkpoint


def np_pack(nibbles: np.ndarray, axis: int) -> np.ndarray:
    """Values 0..15 -> int32 words of 8 nibbles along ``axis``, the lowest nibble first."""
    moved = np.moveaxis(nibbles.astype(np.uint64), axis, 0)
    words = np.zeros((moved.shape[0] // 8,) + moved.shape[1:], dtype=np.uint64)
    for i in range(8):
        words |= moved[i::8] << np.uint64(4 * i)
    return np.moveaxis(words.astype(np.uint32).view(np.int32), 0, axis)


def np_decode(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray,
              offset: int) -> np.ndarray:
    """`[N, K]` float64, element by element."""
    qw, qz = qweight.view(np.uint32), qzeros.view(np.uint32)
    k_in, n_out = qw.shape[0] * 8, qw.shape[1]
    w = np.zeros((n_out, k_in))
    for k in range(k_in):
        g = int(g_idx[k])
        for n in range(n_out):
            q = (int(qw[k // 8, n]) >> (4 * (k % 8))) & 0xF
            z = (int(qz[g, n // 8]) >> (4 * (n % 8))) & 0xF
            w[n, k] = float(scales[g, n]) * (q - (z + offset))
    return w


def random_gptq(k_in: int, n_out: int, group: int, seed: int, act_order: bool = False):
    rng = np.random.default_rng(seed)
    groups = k_in // group
    q = rng.integers(0, 16, (k_in, n_out))
    zeros = rng.integers(0, 15, (groups, n_out))  # stored zero; + offset 1 stays a nibble
    scales = (rng.random((groups, n_out)) * 0.02 + 0.001).astype(np.float16)
    g_idx = np.arange(k_in) // group
    if act_order:  # desc_act checkpoints: any input row may belong to any group
        g_idx = rng.permutation(g_idx)
    return {"qweight": np_pack(q, 0), "qzeros": np_pack(zeros, 1), "scales": scales,
            "g_idx": g_idx.astype(np.int32)}, zeros


@pytest.mark.parametrize("offset", [1, 0], ids=["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True], ids=["sequential", "act-order"])
def test_dequantize_with_many_groups_and_zero_points(offset, act_order):
    parts, zeros = random_gptq(64, 24, 16, seed=3 + offset, act_order=act_order)
    assert len(np.unique(zeros[:, 0])) > 1 and len(np.unique(zeros[0])) > 1  # varies by group and column
    got = dequantize(*(torch.from_numpy(parts[p]) for p in ("qweight", "qzeros", "scales", "g_idx")), offset)
    want = np_decode(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], offset)
    assert got.shape == (24, 64) and got.dtype == torch.float32
    assert np.array_equal(got.double().numpy(), want)  # small integers times fp16 scales: exact


def test_a_checkpoint_with_groups_loads_the_decoded_weights(tmp_path):
    """A tiny GPTQ checkpoint with group_size 32 (4 groups on 128 inputs, 8 on down_proj's 256),
    its zero points replaced by random ones: the loaded, fused layer weights are the decoding."""
    config = dict(GPTQ_CONFIG, group_size=32)
    path = write_checkpoint(tmp_path / "g", "tiny", dtype="float32", quantize_gptq=True,
                            overrides={"quantization_config": config})
    tensors = load_file(str(path / "model.safetensors"))
    rng = np.random.default_rng(0)
    for name in [n for n in tensors if n.endswith(".qzeros")]:
        shape = (tensors[name].shape[0], tensors[name].shape[1] * 8)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(np_pack(rng.integers(0, 15, shape), 1)))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((path / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq"
    model = hal.load_model(path, "cpu", "float32", quantize="dequantize")
    kept = hal.load_model(path, "cpu", "float32")  # containers, prepared by cpu.dequant: the same decoding

    def decoded(prefix: str) -> np.ndarray:
        parts = {p: tensors[f"{prefix}.{p}"].numpy() for p in ("qweight", "qzeros", "scales", "g_idx")}
        assert parts["scales"].shape[0] > 1
        return np_decode(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], offset=1)

    layer = "model.layers.1."
    qkv = np.concatenate([decoded(layer + f"self_attn.{p}_proj") for p in "qkv"])
    gate_up = np.concatenate([decoded(layer + f"mlp.{p}_proj") for p in ("gate", "up")])
    got = model.layers[1]
    assert np.array_equal(got.qkv.double().numpy(), qkv)
    assert np.array_equal(got.o.double().numpy(), decoded(layer + "self_attn.o_proj"))
    assert np.array_equal(got.gate_up.double().numpy(), gate_up)
    assert np.array_equal(got.down.double().numpy(), decoded(layer + "mlp.down_proj"))
    assert np.array_equal(kept.layers[1].qkv.weight.double().numpy(), qkv)
    assert np.array_equal(kept.layers[1].down.weight.double().numpy(), decoded(layer + "mlp.down_proj"))


def test_an_act_order_checkpoint_is_decoded_dense_and_the_report_names_each_linear(tmp_path):
    """desc_act: a g_idx that is not in plain groups has no int4 kernel layout; the load decodes those
    linears (as the test above checks the values of) and says so: ``model.decoded_at_load`` and the
    report's quantization section name every one, with the reason."""
    from validation import quantization

    config = dict(GPTQ_CONFIG, group_size=32, desc_act=True)
    path = write_checkpoint(tmp_path / "g", "tiny", dtype="float32", quantize_gptq=True,
                            overrides={"quantization_config": config})
    tensors = load_file(str(path / "model.safetensors"))
    rng = np.random.default_rng(1)
    permuted = [n for n in tensors if n.endswith("o_proj.g_idx")]
    for name in permuted:  # act order on o_proj only: the other linears stay kept
        tensors[name] = torch.from_numpy(rng.permutation(tensors[name].numpy()))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    model = hal.load_model(path, "cpu", "bfloat16")
    assert sorted(model.decoded_at_load) == sorted(n.replace(".g_idx", ".weight") for n in permuted)
    assert all("not in plain groups" in why for why in model.decoded_at_load.values())
    section = quantization.describe(model)
    layers = model.config.num_hidden_layers
    assert [r["linear"] for r in section["decoded_at_load"]] == [f"layers.{i}.o" for i in range(layers)]
    assert {r["kind"] for r in section["linears"]} == {"qkv", "gate_up", "down"}  # kept
    table = "\n".join(quantization.markdown(section))
    assert f"| o | dense bfloat16 (decoded at load: g_idx is not in plain groups" in table
    assert f"| {layers} |" in table
