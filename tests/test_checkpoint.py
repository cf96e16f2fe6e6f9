"""Checkpoint loading: safetensors only, sharded or single, every tensor checked by name/shape."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import hal
from hal.errors import CheckpointError, DeviceUnavailable, InputError
from model.checkpoint import SINGLE
from model.safetensors_mmap import SafetensorsFile, write_safetensors
from model.synthetic import write_checkpoint


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, change):
    f = SafetensorsFile(path / SINGLE)
    tensors = {name: f.tensor(name).clone() for name in f.entries}
    change(tensors)
    write_safetensors(path / SINGLE, tensors)


def test_sharded_checkpoint_loads_same_logits(tmp_path, tiny_checkpoint, tiny_model):
    sharded = write_checkpoint(tmp_path / "sharded", "tiny", seed=0, shards=3)
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    assert torch.equal(hal.load_model(sharded, "cpu", "float32").logits(ids), tiny_model.logits(ids))


def test_safetensors_roundtrip_is_zero_copy(tmp_path):
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert torch.equal(f.tensor("a"), tensors["a"]) and torch.equal(f.tensor("b"), tensors["b"])
    view = f.tensor("a")
    view.add_(1)  # private mapping: writes never reach the file
    assert torch.equal(SafetensorsFile(tmp_path / "x.safetensors").tensor("a"), tensors["a"])


def test_missing_tensor_is_named(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    _rewrite(ckpt, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError,
                       match=r"missing tensor 'model.layers.2.mlp.up_proj.weight'.*\[256, 128\]"):
        hal.load_model(ckpt, "cpu")


def test_extra_tensor_is_named(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    _rewrite(ckpt, lambda t: t.update({"model.layers.0.mlp.bias": torch.zeros(4)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.mlp.bias'"):
        hal.load_model(ckpt, "cpu")


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    _rewrite(ckpt, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(32, 128)}))
    with pytest.raises(CheckpointError) as err:
        hal.load_model(ckpt, "cpu")
    assert ("'model.layers.1.self_attn.k_proj.weight' has shape [32, 128], expected [64, 128]"
            in str(err.value))


def test_pickle_checkpoint_is_refused(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    (ckpt / SINGLE).unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*pickle checkpoints are refused"):
        hal.load_model(ckpt, "cpu")


def test_corrupt_safetensors_and_bad_index(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    (ckpt / SINGLE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    with pytest.raises(CheckpointError, match="malformed safetensors header"):
        hal.load_model(ckpt, "cpu")
    (ckpt / SINGLE).unlink()
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../evil.safetensors"}}))
    with pytest.raises(CheckpointError, match="bad shard name"):
        hal.load_model(ckpt, "cpu")


def test_missing_folder_device_and_prompt_errors(tmp_path, tiny_checkpoint, tiny_model):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        hal.load_model(tmp_path / "nope", "cpu")
    with pytest.raises(DeviceUnavailable, match="unknown device 'tpu'"):
        hal.load_model(tiny_checkpoint, "tpu")
    with pytest.raises(InputError, match="exceeds max_position_embeddings=4096"):
        tiny_model.logits(torch.ones(1, 4097, dtype=torch.long))
    with pytest.raises(InputError, match="outside"):
        tiny_model.logits(torch.tensor([[1, 1024]]))
    with pytest.raises(InputError, match="LongTensor"):
        tiny_model.logits(torch.ones(1, 3))


def test_bf16_load_keeps_checkpoint_values_and_fuses_projections(tiny_checkpoint):
    model = hal.load_model(tiny_checkpoint, "cpu", "bfloat16")
    stored = SafetensorsFile(tiny_checkpoint / SINGLE)
    parts = [stored.tensor(f"model.layers.1.self_attn.{p}_proj.weight") for p in "qkv"]
    assert model.layers[1].qkv.dtype == torch.bfloat16
    assert torch.equal(model.layers[1].qkv, torch.cat(parts))
    gate, up = (stored.tensor(f"model.layers.3.mlp.{p}_proj.weight") for p in ("gate", "up"))
    assert torch.equal(model.layers[3].gate_up, torch.cat([gate, up]))
    assert torch.equal(model.layers[3].down, stored.tensor("model.layers.3.mlp.down_proj.weight"))
