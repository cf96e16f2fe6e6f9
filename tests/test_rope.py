"""LongRoPE tables against the remote MiniCPMLongRoPE formulas, written out independently, and
mscale moved out of the tables (they stay in [-1, 1], npu_rotary_mul's range) without changing
the model's logits."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import hal

from model.config import parse_config
from model.rope import RopeTable
from model.synthetic import _config


def _expected(cfg_dict: dict, position: int, j: int) -> tuple[float, float, float]:
    dim = cfg_dict["hidden_size"] // cfg_dict["num_attention_heads"]
    scaling = cfg_dict["rope_scaling"]
    original = scaling["original_max_position_embeddings"]
    factors = (scaling["long_factor"] if cfg_dict["max_position_embeddings"] > original
               else scaling["short_factor"])
    angle = position / (factors[j % (dim // 2)] * cfg_dict["rope_theta"] ** (2 * (j % (dim // 2)) / dim))
    # The tables are float32 (as in the remote code): the angle itself carries a rounding
    # error of a few ulps, i.e. ~angle * 2^-22, which bounds the cos/sin difference.
    # The tables leave mscale out (the model applies it as mscale**2 on the q.k scales).
    tol = 1e-6 + abs(angle) * 2.0 ** -22
    return math.cos(angle), math.sin(angle), tol


def _check(cfg_dict: dict) -> None:
    table = RopeTable(parse_config(cfg_dict), torch.device("cpu"))
    positions = torch.tensor([[0, 1, 7, 300, 4095]])
    cos, sin = table(positions)
    dim = cos.shape[-1]
    for t, pos in enumerate(positions[0].tolist()):
        for j in (0, 1, dim // 2 - 1, dim // 2, dim - 1):
            want_cos, want_sin, tol = _expected(cfg_dict, pos, j)
            assert math.isclose(cos[0, t, j].item(), want_cos, abs_tol=tol), (pos, j)
            assert math.isclose(sin[0, t, j].item(), want_sin, abs_tol=tol), (pos, j)


def test_long_factors_and_mscale_when_max_exceeds_original():
    cfg = _config("tiny")
    assert cfg["max_position_embeddings"] > cfg["rope_scaling"]["original_max_position_embeddings"]
    assert cfg["rope_scaling"]["long_factor"] != cfg["rope_scaling"]["short_factor"]
    _check(cfg)
    table = RopeTable(parse_config(cfg), torch.device("cpu"))
    assert table.mscale == math.sqrt(1 + math.log(2) / math.log(2048))


def test_short_factors_and_unit_mscale_at_native_length():
    cfg = copy.deepcopy(_config("tiny"))
    cfg["max_position_embeddings"] = 2048
    _check(cfg)
    assert RopeTable(parse_config(cfg), torch.device("cpu")).mscale == 1.0


def test_table_growth_does_not_change_values():
    cfg = parse_config(_config("tiny"))
    small = RopeTable(cfg, torch.device("cpu"))
    first = small(torch.tensor([[5, 6]]))[0].clone()
    small(torch.tensor([[3000]]))  # grows the table
    assert torch.equal(small(torch.tensor([[5, 6]]))[0], first)


@pytest.mark.parametrize("preset", ["tiny", "0.5b", "8b", "4.1-8b"])
def test_tables_stay_within_unit_range(preset):
    """npu_rotary_mul documents r1/r2 in [-1, 1]: every LongRoPE preset's table over its whole
    context stays there (the remote code's mscale-scaled tables reach 1.044 on tiny)."""
    cfg = parse_config(_config(preset))
    table = RopeTable(cfg, torch.device("cpu"))
    cos, sin = table(torch.arange(0, cfg.max_position_embeddings, 7)[None])
    assert float(cos.abs().max()) <= 1.0 and float(sin.abs().max()) <= 1.0
    assert float(cos.abs().max()) == 1.0  # position 0: cos = 1 exactly, whatever mscale is


def _baked(model) -> None:
    """The remote code's formulation on ``model``: mscale inside cos/sin, unscaled q.k scales."""
    rope, mscale = model.rope, model.rope.mscale
    grow = rope._grow

    def grow_scaled(length: int) -> None:
        grow(length)
        rope._cos, rope._sin = rope._cos * mscale, rope._sin * mscale

    rope._grow = grow_scaled
    if model.config.attn_use_rope:
        model.attn_scale = model.attn_scale / rope.qk_scale
    if model.lightning_scale is not None and model.config.lightning.use_rope:
        model.lightning_scale = model.lightning_scale / rope.qk_scale


_LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 2048,
             "long_factor": [1.0 + 0.2 * i for i in range(16)], "short_factor": [1.0] * 16}
_SPARSE_8B_STYLE = {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16, "window_size": 32,
                    "topk": 3, "use_nope": False, "dense_len": 64}  # MiniCPM4-8B's InfLLM-v2, scaled down


@pytest.mark.parametrize("variant", ["tiny", "tiny-infllm-8b-style", "tiny-sala-longrope"])
def test_mscale_outside_the_tables_leaves_logits_unchanged(tmp_path, variant):
    """Logits with mscale**2 on the scales == logits with mscale baked into cos/sin (the remote
    code), on LongRoPE presets with mscale != 1: dense attention, InfLLM-v2 block selection and
    sparse attention (prompt past dense_len, then decode steps), lightning layers with RoPE."""
    from model.synthetic import write_checkpoint

    preset, overrides = {"tiny": ("tiny", {}),
                         "tiny-infllm-8b-style": ("tiny", {"sparse_config": _SPARSE_8B_STYLE}),
                         "tiny-sala-longrope": ("tiny-sala", {"rope_scaling": _LONGROPE,
                                                                "use_output_norm": False})}[variant]
    path = write_checkpoint(tmp_path / variant, preset, seed=5, overrides=overrides)
    ids = torch.tensor([[(37 * i) % 1000 + 3 for i in range(164)]])  # 10 blocks of 16: 4 dropped by selection
    runs = []
    for baked in (False, True):
        model = hal.load_model(path, "cpu", "float32")
        assert model.rope.mscale > 1.01
        if baked:
            _baked(model)
        cache = model.new_cache(1, 256)
        steps = [model.forward(ids[:, :160], cache=cache).logits[:, -1]]
        steps += [model.forward(ids[:, t:t + 1], cache=cache).logits[:, -1] for t in range(160, 164)]
        runs.append(torch.cat(steps))
    ours, remote = runs
    assert torch.allclose(ours, remote, rtol=1e-4, atol=1e-4 * float(remote.abs().max())), \
        float((ours - remote).abs().max())
