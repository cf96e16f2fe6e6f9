"""model/ternary.py's detection of fake-quantized BitCPM4 weights, on weights built here with a known
granularity: every group holds values in {-s, 0, +s} for its own s (research/minicpm4_spec.md §6.1)."""
from __future__ import annotations

import pytest
import torch

from hal.errors import CheckpointError
from model.ternary import detect, pack


def ternary(out: int, k: int, group: int, seed: int = 0, dtype=torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [out, k] in dtype, its scales float32 [out, k // group]): codes in {-1, 0, 1}, each group's
    scale a distinct value exact in bfloat16 (a power of two times 1 + j / 8)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (out, k), generator=g)
    codes[:, ::group] = 1  # every group has a nonzero: its magnitude is the group's scale
    j = torch.randint(0, 8, (out, k // group), generator=g)
    e = torch.randint(-8, -2, (out, k // group), generator=g)
    scales = (1 + j / 8) * torch.pow(2.0, e.float())
    return (codes * scales.repeat_interleave(group, dim=1)).to(dtype), scales


@pytest.mark.parametrize("group", [256, 128, 64, 32])
def test_the_largest_group_that_holds_is_found_with_its_scales(group):
    weight, scales = ternary(24, 256, group, seed=group)
    found = detect(weight)
    assert found is not None
    got_group, got_scales = found
    # per row (256 = K) is tried first: a weight built per row is per row even if smaller groups also hold
    assert got_group == group
    assert torch.equal(got_scales, scales)


def test_a_per_row_weight_with_k_not_a_candidate():
    weight, scales = ternary(8, 96, 96)
    group, got = detect(weight)
    assert group == 96 and torch.equal(got, scales)


def test_zero_groups_and_a_zero_row_are_ternary():
    weight, _ = ternary(4, 128, 64)
    weight[1] = 0
    weight[2, 64:] = 0
    group, scales = detect(weight)
    assert group == 64 and float(scales[1].abs().sum()) == 0 and float(scales[2, 1]) == 0


@pytest.mark.parametrize("where", ["one value moved", "two magnitudes in every group size"])
def test_a_weight_that_is_not_ternary_is_refused_naming_it(where):
    weight, _ = ternary(4, 128, 32)
    if where == "one value moved":
        weight[0, 5] = weight[0, 0] * 0.75  # a third magnitude in group 0 of row 0: no group size holds
    else:
        weight = torch.randn(4, 128).to(torch.bfloat16)
    assert detect(weight) is None
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.down_proj.weight: not a ternary weight"):
        pack("model.layers.0.mlp.down_proj.weight", weight)


def test_packing_decodes_to_the_stored_values_exactly():
    weight, _ = ternary(16, 128, 64, seed=3)
    packed = pack("w", weight)
    assert packed.group_size == 64
    assert torch.equal(packed.dequantize(), weight.float())
