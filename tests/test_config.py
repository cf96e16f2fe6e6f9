"""config.json validation: every bad field gets a ConfigError naming the file and the field."""
from __future__ import annotations

import copy
import json
import math

import pytest

from hal.errors import ConfigError
from model.config import load_config, load_generation_config, parse_config
from model.synthetic import _config


@pytest.fixture()
def good() -> dict:
    return copy.deepcopy(_config("tiny"))


def test_real_shapes_parse_with_mup_scalars():
    for preset, heads_per_kv, tied, alpha in (("0.5b", 8, True, 1.4 / math.sqrt(24)),
                                              ("8b", 16, False, 1.4 / math.sqrt(32))):
        cfg = parse_config(_config(preset))
        assert cfg.num_attention_heads // cfg.num_key_value_heads == heads_per_kv
        assert cfg.tie_word_embeddings is tied
        assert cfg.residual_scale == pytest.approx(alpha)
        assert cfg.logit_scale == cfg.hidden_size / 256
    assert parse_config(_config("0.5b")).head_dim == 64
    assert parse_config(_config("8b")).head_dim == 128
    assert parse_config(_config("4.1-8b")).max_position_embeddings == 65536


def test_defaults_follow_remote_minicpm_config(good):
    for key in ("rms_norm_eps", "rope_theta", "scale_emb", "scale_depth", "dim_model_base",
                "tie_word_embeddings", "num_key_value_heads", "rope_scaling"):
        good.pop(key)
    cfg = parse_config(good)
    assert (cfg.rms_norm_eps, cfg.rope_theta, cfg.scale_emb, cfg.scale_depth, cfg.dim_model_base) == (
        1e-6, 10000.0, 1.0, 1.0, 1.0)
    assert cfg.tie_word_embeddings is True
    assert cfg.num_key_value_heads == cfg.num_attention_heads
    assert cfg.rope_scaling is None


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.pop("hidden_size"), "hidden_size"),
    (lambda c: c.update(hidden_size="128"), "hidden_size"),
    (lambda c: c.update(num_hidden_layers=True), "num_hidden_layers"),
    (lambda c: c.update(vocab_size=0), "vocab_size"),
    (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda c: c.update(hidden_size=130), "hidden_size"),
    (lambda c: c.update(rms_norm_eps="small"), "rms_norm_eps"),
    (lambda c: c.update(scale_depth=-1), "scale_depth"),
    (lambda c: c.update(architectures=["LlamaForCausalLM"]), "architectures"),
    (lambda c: c.update(architectures="MiniCPMForCausalLM"), "architectures"),
    (lambda c: c.update(model_type="llama"), "model_type"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(tie_word_embeddings="yes"), "tie_word_embeddings"),
    (lambda c: c.update(eos_token_id=[2, 99999]), "eos_token_id"),
    (lambda c: c["rope_scaling"].update(rope_type="yarn"), "rope_scaling.rope_type"),
    (lambda c: c["rope_scaling"].update(long_factor=[1.0] * 3), "rope_scaling.long_factor"),
    (lambda c: c["rope_scaling"].update(short_factor=None), "rope_scaling.short_factor"),
    (lambda c: c["rope_scaling"].pop("original_max_position_embeddings"),
     "rope_scaling.original_max_position_embeddings"),
])
def test_bad_field_is_named(good, mutate, field):
    mutate(good)
    with pytest.raises(ConfigError) as err:
        parse_config(good, source="/x/config.json")
    message = str(err.value)
    assert message.startswith("/x/config.json: field '" + field + "'"), message
    assert "\n" not in message


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config.json: config.json not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 12,}')
    with pytest.raises(ConfigError, match=r"malformed JSON at line 1"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_config(tmp_path)


def test_generation_config(tmp_path):
    assert load_generation_config(tmp_path).do_sample is False  # absent: greedy
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.8, "top_p": 0.8, "eos_token_id": [2, 73440]}))
    gen = load_generation_config(tmp_path)
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.eos_token_ids) == (True, 0.8, 0.8, (2, 73440))
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(ConfigError, match="'top_p'"):
        load_generation_config(tmp_path)
