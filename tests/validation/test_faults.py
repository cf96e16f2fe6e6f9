"""Each injected fault of validation/faults.py does the wrong thing it names, checked against
attention and rotary written out here (not against the fault's own code)."""
from __future__ import annotations

import math

import pytest
import torch

from validation import faults


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One query `[D]` over keys/values `[S, D]`."""
    w = torch.softmax((keys @ q) * scale, dim=0)
    return w @ values


@pytest.fixture()
def qkv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 5, 4, 8, generator=g)  # B, T, H, D
    k = torch.randn(1, 5, 2, 8, generator=g)  # Hk = 2: group of 2
    v = torch.randn(1, 5, 2, 8, generator=g)
    return q, k, v


def test_causal_mask_admits_one_future_token(qkv):
    q, k, v = qkv
    scale = 8 ** -0.5
    out = faults.FAULTS["causal-future-token"].overrides()["attention_prefill"](q, k, v, None, scale)
    for t in range(5):
        seen = min(t + 2, 5)  # keys 0 .. t+1
        expect = attend(q[0, t, 3], k[0, :seen, 1], v[0, :seen, 1], scale)
        assert torch.allclose(out[0, t, 3], expect, atol=1e-5)


def test_gqa_shift_reads_the_next_group(qkv):
    q, k, v = qkv
    scale = 8 ** -0.5
    out = faults.FAULTS["gqa-shift"].overrides()["attention_prefill"](q, k, v, None, scale)
    for head, kv_head in ((0, 1), (1, 1), (2, 0), (3, 0)):
        expect = attend(q[0, 4, head], k[0, :, kv_head], v[0, :, kv_head], scale)
        assert torch.allclose(out[0, 4, head], expect, atol=1e-5)


@pytest.mark.parametrize("name,scale", [("attn-scale-1", lambda s: 1.0), ("attn-scale-1.05", lambda s: 1.05 * s)])
def test_attention_scale_faults(qkv, name, scale):
    q, k, v = qkv
    s = 8 ** -0.5
    out = faults.FAULTS[name].overrides()["attention_decode"](q[:, -1:], k, v, torch.tensor([5]), s)
    assert torch.allclose(out[0, 0, 0], attend(q[0, 4, 0], k[0, :, 0], v[0, :, 0], scale(s)), atol=1e-5)


def test_decode_reads_the_previous_slot(qkv):
    q, k, v = qkv
    s = 8 ** -0.5
    out = faults.FAULTS["decode-prev-slot"].overrides()["attention_decode"](q[:, -1:], k, v, torch.tensor([5]), s)
    keys = torch.cat([k[0, :4, 0], k[0, 3:4, 0]])  # slot 4 holds position 3's key and value
    values = torch.cat([v[0, :4, 0], v[0, 3:4, 0]])
    assert torch.allclose(out[0, 0, 1], attend(q[0, 4, 1], keys, values, s), atol=1e-5)
    assert not torch.allclose(out[0, 0, 1], attend(q[0, 4, 1], k[0, :, 0], v[0, :, 0], s), atol=1e-3)


def test_rotary_interleaved_rotates_adjacent_pairs():
    q = torch.arange(1.0, 5.0).view(1, 1, 1, 4)  # D = 4: pairs (x0, x1), (x2, x3)
    a, b = 0.3, 1.1  # the two angles, in the model's half layout [a, b, a, b]
    cos = torch.tensor([math.cos(a), math.cos(b)] * 2).view(1, 1, 4)
    sin = torch.tensor([math.sin(a), math.sin(b)] * 2).view(1, 1, 4)
    out, _ = faults.FAULTS["rotary-interleaved"].overrides()["rotary"](q, q, cos, sin)
    x0, x1, x2, x3 = 1.0, 2.0, 3.0, 4.0
    expect = [x0 * math.cos(a) - x1 * math.sin(a), x1 * math.cos(a) + x0 * math.sin(a),
              x2 * math.cos(b) - x3 * math.sin(b), x3 * math.cos(b) + x2 * math.sin(b)]
    assert torch.allclose(out.flatten(), torch.tensor(expect), atol=1e-6)


def test_rms_eps_fault_uses_a_hundred_times_eps():
    x = torch.tensor([[1e-3, -2e-3, 3e-3, 0.0]])
    out = faults.FAULTS["rms-eps-x100"].overrides()["rms_norm"](x, torch.ones(4), 1e-6)
    assert torch.allclose(out, x / torch.sqrt((x * x).mean() + 1e-4), rtol=1e-5)


def test_residual_scale_hook_drops_the_middle_layer_only(tiny_model):
    import copy

    model = copy.copy(tiny_model)
    model.residual_scales = list(tiny_model.residual_scales)
    faults.FAULTS["residual-scale-dropped"].install(model)
    alpha = tiny_model.config.residual_scale
    assert alpha != 1.0
    expect = [alpha] * len(model.layers)
    expect[len(model.layers) // 2] = 1.0
    assert model.residual_scales == expect


def test_required_and_reported_faults():
    assert set(faults.REQUIRED) == {"causal-future-token", "rotary-interleaved", "gqa-shift", "attn-scale-1",
                                    "decode-prev-slot", "residual-scale-dropped"}
    assert set(faults.REPORTED) == {"attn-scale-1.05", "rms-eps-x100"}
