"""LongRoPE tables against the remote MiniCPMLongRoPE formulas, written out independently."""
from __future__ import annotations

import copy
import math

import torch

from model.config import parse_config
from model.rope import RopeTable
from model.synthetic import _config


def _expected(cfg_dict: dict, position: int, j: int) -> tuple[float, float, float]:
    dim = cfg_dict["hidden_size"] // cfg_dict["num_attention_heads"]
    scaling = cfg_dict["rope_scaling"]
    original = scaling["original_max_position_embeddings"]
    scale = cfg_dict["max_position_embeddings"] / original
    factors = (scaling["long_factor"] if cfg_dict["max_position_embeddings"] > original
               else scaling["short_factor"])
    mscale = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
    angle = position / (factors[j % (dim // 2)] * cfg_dict["rope_theta"] ** (2 * (j % (dim // 2)) / dim))
    # The tables are float32 (as in the remote code): the angle itself carries a rounding
    # error of a few ulps, i.e. ~angle * 2^-22, which bounds the cos/sin difference.
    tol = 1e-6 + abs(angle) * 2.0 ** -22 * mscale
    return math.cos(angle) * mscale, math.sin(angle) * mscale, tol


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
