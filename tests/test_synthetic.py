"""Synthetic checkpoints: complete HF layout, deterministic, peaked next-token distributions."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

import hal
from hal.errors import HalError
from model.checkpoint import expected_shapes
from model.config import load_config
from model.safetensors_mmap import SafetensorsFile
from model.synthetic import write_checkpoint
from validation.prompts import DEFAULT_PROMPTS

MINICPM_FIELDS = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_act",
                  "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "scale_emb",
                  "scale_depth", "dim_model_base", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                  "torch_dtype", "initializer_range")


def test_layout_is_complete(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= names
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert all(field in config for field in MINICPM_FIELDS)
    tensors = SafetensorsFile(tiny_checkpoint / "model.safetensors").entries
    assert {n: e.shape for n, e in tensors.items()} == expected_shapes(load_config(tiny_checkpoint))
    assert {e.dtype for e in tensors.values()} == {torch.bfloat16}


def test_deterministic_per_seed(tmp_path, tiny_checkpoint):
    again = write_checkpoint(tmp_path / "again", "tiny", seed=0)
    other = write_checkpoint(tmp_path / "other", "tiny", seed=1)

    def digest(path):
        return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()

    assert digest(again) == digest(tiny_checkpoint)
    assert digest(other) != digest(tiny_checkpoint)


def test_next_token_distributions_are_peaked(tiny_model):
    tok = tiny_model.tokenizer
    top1 = []
    for prompt in DEFAULT_PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        top1.append(tiny_model.logits(ids)[0, -1].softmax(-1).max().item())
    assert sum(top1) / len(top1) >= 0.2, top1


def test_refuses_non_empty_output_and_leaves_no_partial_folder(tmp_path):
    target = tmp_path / "x"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(HalError, match="not empty"):
        write_checkpoint(target, "tiny")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    with pytest.raises(HalError, match="unknown preset"):
        write_checkpoint(tmp_path / "y", "13b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_untied_variant_has_lm_head(tmp_path):
    path = write_checkpoint(tmp_path / "u", "tiny", overrides={"tie_word_embeddings": False})
    model = hal.load_model(path, "cpu")
    assert "lm_head.weight" in SafetensorsFile(path / "model.safetensors").entries
    assert model.lm_head is not model.embed
