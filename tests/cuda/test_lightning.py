"""cuda.triton lightning_attention against the token-by-token float32 reference: decode steps
from a state, prefill within one chunk, around it and over several (last partial), batch > 1,
head_dim 32/64/128, an odd head count; the state stays float32 (its own 1e-10 NMSE bound)."""
from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE, assert_matches_reference, cases

from backends.cuda.lightning import lightning_attention_triton

SHAPES = [
    ({"B": 1, "T": 1, "H": 4, "D": 64}, ("state",)),
    ({"B": 2, "T": 1, "H": 3, "D": 128}, ("state",)),
    ({"B": 2, "T": 17, "H": 4, "D": 64}, ()),
    ({"B": 1, "T": 65, "H": 2, "D": 64}, ("state",)),
    ({"B": 2, "T": 130, "H": 2, "D": 64}, ("state",)),
    ({"B": 1, "T": 66, "H": 2, "D": 128}, ()),
    ({"B": 1, "T": 20, "H": 2, "D": 32}, ("state",)),  # tiny-sala's head_dim
]


@pytest.mark.parametrize("c", cases("lightning_attention", SHAPES))
def test_lightning_attention_matches_reference(c):
    assert_matches_reference(c, lightning_attention_triton)


def test_state_is_not_modified_and_chunks_compose():
    """Two calls (40 then 30 tokens) from the returned state equal one call over 70 tokens."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 70, 2, 64, generator=g).to(DEVICE) for _ in range(3))
    slopes = torch.tensor([0.5, 0.01], device=DEVICE)
    state = torch.randn(1, 2, 64, 64, generator=g).to(DEVICE)
    kept = state.clone()
    o_all, s_all = lightning_attention_triton(q, k, v, slopes, state, 0.125)
    o_a, s_a = lightning_attention_triton(q[:, :40], k[:, :40], v[:, :40], slopes, state, 0.125)
    o_b, s_b = lightning_attention_triton(q[:, 40:], k[:, 40:], v[:, 40:], slopes, s_a, 0.125)
    assert torch.equal(state, kept)
    assert s_all.dtype == torch.float32
    assert torch.allclose(torch.cat([o_a, o_b], 1), o_all, atol=1e-4, rtol=1e-4)
    assert torch.allclose(s_b, s_all, atol=1e-4, rtol=1e-4)
