"""The right-ragged KVCache through the model: left-padded rows go to slots 0.. of their cache
rows, chunks after the first attend over the whole cache buffers with per-row kv_lens, and the
logits equal a forward pass without a cache."""
from __future__ import annotations

import torch

from model.cache import KV_BLOCK, KVCache, round_capacity


def test_capacity_is_rounded_to_whole_pages():
    assert [round_capacity(n) for n in (1, 127, 128, 129, 300)] == [128, 128, 128, 256, 384]
    cache = KVCache(2, 3, 20, 2, 16, torch.float32, torch.device("cpu"))
    assert cache.capacity == KV_BLOCK and cache.keys[0].shape == (3, KV_BLOCK, 2, 16)
    assert cache.lengths.tolist() == [0, 0, 0]


def test_plan_skips_left_padding_and_rows_stay_ragged():
    cache = KVCache(1, 2, 16, 1, 8, torch.float32, torch.device("cpu"))
    slots, kv_lens = cache.plan(4, torch.tensor([0, 3]))
    assert slots.tolist() == [[0, 1, 2, 3], [-1, -1, -1, 0]] and kv_lens.tolist() == [4, 1]
    cache.advance(4)
    slots, kv_lens = cache.plan(2, torch.tensor([0, 3]))
    assert slots.tolist() == [[4, 5], [1, 2]] and kv_lens.tolist() == [6, 3]
    cache.advance(2)
    assert cache.length == 6 and cache.lengths.tolist() == [6, 3]


def test_chunked_prefill_and_decode_with_left_padding_match_no_cache(tiny_model):
    model = tiny_model
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, cfg.vocab_size, (3, 14), generator=g)
    starts = torch.tensor([0, 4, 9])
    full = model.forward(ids, kv_start=starts).logits
    cache = model.new_cache(3, 14)
    got = [model.forward(ids[:, :6], cache=cache, kv_start=starts).logits,  # row 2 all padding
           model.forward(ids[:, 6:11], cache=cache, kv_start=starts).logits]  # T=5 on attention_decode
    for t in range(11, 14):
        got.append(model.forward(ids[:, t:t + 1], cache=cache, kv_start=starts).logits)
    assert cache.lengths.tolist() == [14, 10, 5]
    got = torch.cat(got, dim=1)
    real = torch.arange(14)[None] >= starts[:, None]  # padding positions' logits are unspecified
    assert torch.allclose(got[real], full[real], atol=1e-4, rtol=1e-4)
