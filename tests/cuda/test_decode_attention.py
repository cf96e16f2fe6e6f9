"""cuda.triton attention_decode (flash-decoding) against the float32 reference: GQA 1/2/3/4/8/16,
head_dim 32/64/128, odd lengths, T > 1, ragged batches, several splits, empty queries."""
from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE, assert_matches_reference, cases

from backends.cpu.reference.attention import attention_decode_ref
from backends.cuda.decode_attention import attention_decode_triton, choose_splits

SHAPES = [
    ({"B": 1, "T": 1, "S": 1, "C": 128, "H": 4, "Hk": 4, "D": 64}, ()),
    ({"B": 1, "T": 1, "S": 65, "C": 128, "H": 4, "Hk": 2, "D": 128}, ()),
    ({"B": 2, "T": 2, "S": 33, "C": 128, "H": 6, "Hk": 2, "D": 64}, ("ragged",)),  # G = 3
    ({"B": 2, "T": 1, "S": 200, "C": 256, "H": 8, "Hk": 2, "D": 64}, ("ragged",)),
    ({"B": 1, "T": 1, "S": 63, "C": 128, "H": 16, "Hk": 2, "D": 32}, ()),
    ({"B": 1, "T": 3, "S": 40, "C": 128, "H": 16, "Hk": 1, "D": 128}, ()),
    ({"B": 3, "T": 4, "S": 130, "C": 256, "H": 4, "Hk": 2, "D": 64}, ("ragged",)),
    # 3 splits per row (capacity 768), the second row shorter: some splits see fewer keys
    ({"B": 2, "T": 1, "S": 700, "C": 768, "H": 4, "Hk": 1, "D": 64}, ("ragged",)),
]


def test_long_rows_are_split():
    assert choose_splits(2, 768) == 3 and choose_splits(2, 128) == 1
    assert choose_splits(1000, 1 << 17) == 1  # enough programs already: no split


@pytest.mark.parametrize("c", cases("attention_decode", SHAPES))
def test_attention_decode_matches_reference(c):
    assert_matches_reference(c, attention_decode_triton)


def test_queries_that_see_no_key_return_zeros():
    """T = 3 new queries, row 1 holds 1 key (its first two queries are left padding inside the
    chunk) and row 2 none; unused positions hold NaN and must never be read."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 3, 4, 64, generator=g)
    k = torch.randn(3, 128, 2, 64, generator=g)
    v = torch.randn(3, 128, 2, 64, generator=g)
    kv_lens = torch.tensor([5, 1, 0])
    for b, n in enumerate(kv_lens.tolist()):
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    ref = attention_decode_ref(q, k, v, kv_lens, 0.125)
    out = attention_decode_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), kv_lens.to(DEVICE), 0.125).cpu()
    assert torch.isfinite(out).all()
    assert (out[1, :2] == 0).all() and (out[2] == 0).all() and out[1, 2].abs().sum() > 0
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
