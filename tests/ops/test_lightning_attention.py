"""lightning_attention: every CPU implementation against the float32 reference (catalogue
tolerances), plus checks that need no reference: hand-computed tiny cases run through every
implementation (the reference included), and the chunked implementation fed a sequence in one
call, in uneven chunked-prefill pieces and one token per call (the state carried between calls)."""
from __future__ import annotations

import math

import pytest
import torch
from cpu_conformance import assert_conforms, params

from backends.cpu.lightning import lightning_attention_cpu
from hal.ops import get_spec
from hal.registry import implementations
from validation.opcheck import case, check, nmse, sala_slopes

SPEC = get_spec("lightning_attention")
ALL_CPU = [pytest.param(i.load(), id=i.qualname) for i in implementations("lightning_attention", "cpu")]


@pytest.mark.parametrize(("impl", "case"), params("lightning_attention"))
def test_lightning_attention_matches_reference(impl, case):
    assert_conforms(impl, case)


@pytest.mark.parametrize("fn", ALL_CPU)
def test_scalar_heads_by_hand(fn):
    # B=1, T=3, H=2, D=1, scale 1, both heads from state 4, q = (1, 2, 1), k = (1, 1, 2), v = (2, 4, 1).
    # head 0, slope ln 2 (lambda 1/2): S = 1/2*4 + 1*2 = 4, o = 1*4 = 4; S = 1/2*4 + 1*4 = 6, o = 2*6 = 12;
    #   S = 1/2*6 + 2*1 = 5, o = 1*5 = 5.
    # head 1, slope 0 (lambda 1, no decay): S = 4 + 2 = 6, o = 6; S = 6 + 4 = 10, o = 2*10 = 20;
    #   S = 10 + 2*1 = 12, o = 12.
    def tokens(*values):
        return torch.tensor(values, dtype=torch.float32)[None, :, None, None].expand(1, 3, 2, 1)

    slopes = torch.tensor([math.log(2.0), 0.0])
    o, new_state = fn(tokens(1, 2, 1), tokens(1, 1, 2), tokens(2, 4, 1), slopes,
                      torch.full((1, 2, 1, 1), 4.0), 1.0)
    torch.testing.assert_close(o[0, :, :, 0], torch.tensor([[4.0, 6.0], [12.0, 20.0], [5.0, 12.0]]))
    torch.testing.assert_close(new_state.flatten(), torch.tensor([5.0, 12.0]))


@pytest.mark.parametrize("fn", ALL_CPU)
def test_state_orientation_and_read_after_update_by_hand(fn):
    # B=1, T=2, H=1, D=2, slope ln 2 (lambda 1/2), scale 1/2, zero state; S is [D_k, D_v].
    # t=1: k=(1,0), v=(0,2): S = outer(k, v) = [[0,2],[0,0]]; q=(2,0): o = 1/2 * q @ S = (0, 2).
    # t=2: k=(0,1), v=(3,0): S = 1/2*[[0,2],[0,0]] + [[0,0],[3,0]] = [[0,1],[3,0]]; q=(2,2): q @ S = (6, 2),
    #   o = (3, 1). (outer(v, k) would give o_1 = 0; reading before the update, o_1 = 0; adding before
    #   decaying, o_1 = (0, 1).)
    q = torch.tensor([[2.0, 0.0], [2.0, 2.0]])[None, :, None]
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None, :, None]
    v = torch.tensor([[0.0, 2.0], [3.0, 0.0]])[None, :, None]
    o, new_state = fn(q, k, v, torch.tensor([math.log(2.0)]), torch.zeros(1, 1, 2, 2), 0.5)
    torch.testing.assert_close(o[0, :, 0], torch.tensor([[0.0, 2.0], [3.0, 1.0]]))
    torch.testing.assert_close(new_state[0, 0], torch.tensor([[0.0, 1.0], [3.0, 0.0]]))


def _sequence(new: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch, heads, dim = 2, 4, 16
    q, k, v = (torch.randn(batch, new, heads, dim, generator=g) for _ in range(3))
    state = torch.randn(batch, heads, dim, dim, generator=g)
    return q, k, v, sala_slopes(heads), state, dim ** -0.5


@pytest.mark.parametrize("pieces", [(130,), (70, 60), (1,) * 130], ids=["one-call", "70+60", "per-token"])
def test_chunked_prefill_and_decode_continue_one_call(pieces):
    """Chunks of 64 with a partial last one (130 = 64+64+2) in one call must equal the same tokens
    in pieces that cut the chunks elsewhere, and one decode step per token, state carried."""
    q, k, v, slopes, state, scale = _sequence(sum(pieces))
    whole_o, whole_state = lightning_attention_cpu(q, k, v, slopes, state, scale)
    outs, start = [], 0
    for n in pieces:
        part = slice(start, start + n)
        o, state = lightning_attention_cpu(q[:, part], k[:, part], v[:, part], slopes, state, scale)
        outs.append(o)
        start += n
    assert nmse(whole_o, torch.cat(outs, dim=1)) <= SPEC.tolerance("float32", "o")
    assert nmse(whole_state, state) <= SPEC.tolerance("float32", "new_state")


@pytest.mark.parametrize("fn", ALL_CPU)
def test_input_state_is_not_modified(fn):
    q, k, v, slopes, state, scale = _sequence(5)
    before = state.clone()
    fn(q, k, v, slopes, state, scale)
    assert torch.equal(state, before)


def test_a_state_rounded_to_bf16_is_caught():
    """new_state has a float32 bound in every dtype: rounding it to the model dtype fails even
    where o's bf16 bound would let it through."""

    def rounds_the_state(q, k, v, slopes, state, scale):
        o, new_state = lightning_attention_cpu(q, k, v, slopes, state, scale)
        return o, new_state.to(torch.bfloat16).float()

    decode = case("lightning_attention", "bfloat16", ("state",), B=1, T=1, H=4, D=64)
    result = check(decode, rounds_the_state)
    assert result.status == "FAIL" and result.output == "new_state", result.line()
    assert result.error <= SPEC.tolerance("bfloat16", "o")  # one shared bound would have passed it
    assert check(decode, lightning_attention_cpu).status == "ok"


def test_a_bf16_state_is_refused():
    q, k, v, slopes, state, scale = _sequence(3)
    with pytest.raises(ValueError, match="state must be float32"):
        lightning_attention_cpu(q, k, v, slopes, state.to(torch.bfloat16), scale)
