"""The emulator itself against independent formulas, and its strictness: calls the real torch_npu
ops reject are rejected here with a one-line reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends.npu import emulator as E
from backends.npu.emulator import EmulatedOpError, NotEmulatedError

G = torch.Generator().manual_seed(0)


def rnd(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=G).to(dtype)


def manual_attention(q, k, v, scale, keep):
    """q `[Sq, N, D]`, k/v `[Skv, N, D]` (heads already matched), keep `[Sq, Skv]`: float32."""
    s = torch.einsum("qnd,knd->nqk", q.float(), k.float()) * scale
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.einsum("nqk,knd->qnd", p, v.float())


def causal(sq, skv, bottom_right=True):
    i, j = torch.arange(sq)[:, None], torch.arange(skv)[None]
    return j <= i + (skv - sq if bottom_right else 0)


MASK = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)


def test_fia_default_scale_is_one_and_no_mask_is_full_attention():
    q, k, v = rnd(1, 5, 2, 64), rnd(1, 7, 2, 64), rnd(1, 7, 2, 64)
    out, _ = E.npu_fused_infer_attention_score(q, k, v, num_heads=2, input_layout="BSND")
    want = manual_attention(q[0], k[0], v[0], 1.0, torch.ones(5, 7, dtype=torch.bool))
    assert torch.allclose(out[0].float(), want, atol=2e-2)


@pytest.mark.parametrize("mode,bottom_right", [(2, False), (3, True)])
def test_fia_causal_modes_and_gqa(mode, bottom_right):
    q, k, v = rnd(1, 4, 4, 64), rnd(1, 9, 2, 64), rnd(1, 9, 2, 64)
    out, _ = E.npu_fused_infer_attention_score(q, k, v, atten_mask=MASK, num_heads=4, num_key_value_heads=2,
                                               scale=0.125, input_layout="BSND", sparse_mode=mode)
    kk, vv = k[0].repeat_interleave(2, 1), v[0].repeat_interleave(2, 1)
    want = manual_attention(q[0], kk, vv, 0.125, causal(4, 9, bottom_right))
    assert torch.allclose(out[0].float(), want, atol=2e-2)


def test_fia_layouts_agree():
    q, k, v = rnd(2, 3, 2, 64), rnd(2, 6, 2, 64), rnd(2, 6, 2, 64)
    bsnd, _ = E.npu_fused_infer_attention_score(q, k, v, num_heads=2, input_layout="BSND", scale=0.1)
    bsh, _ = E.npu_fused_infer_attention_score(q.flatten(2), k.flatten(2), v.flatten(2), num_heads=2,
                                               input_layout="BSH", scale=0.1)
    bnsd, _ = E.npu_fused_infer_attention_score(*(t.transpose(1, 2).contiguous() for t in (q, k, v)),
                                                num_heads=2, input_layout="BNSD", scale=0.1)
    assert torch.equal(bsnd.flatten(2), bsh) and torch.equal(bsnd, bnsd.transpose(1, 2))


def test_fia_tnd_lengths_are_cumulative_and_paged_kv_lengths_per_request():
    q, kv = rnd(7, 2, 128), rnd(7, 2, 128)
    out, _ = E.npu_fused_infer_attention_score(q, kv, kv, atten_mask=MASK, actual_seq_lengths=[3, 7],
                                               actual_seq_lengths_kv=[3, 7], num_heads=2, input_layout="TND",
                                               sparse_mode=3, scale=0.125)
    second = manual_attention(q[3:], kv[3:], kv[3:], 0.125, causal(4, 4))
    assert torch.allclose(out[3:].float(), second, atol=2e-2)
    cache = torch.zeros(4, 128, 2, 128, dtype=torch.bfloat16)
    E.npu_scatter_pa_kv_cache(kv, kv, cache, cache.clone(), torch.tensor([256, 257, 258, 0, 1, 2, 3]),
                              cache_mode="Norm")
    assert torch.equal(cache[2, :3], kv[:3]) and torch.equal(cache[0, :4], kv[3:])
    table = torch.tensor([[2, 3], [0, 1]], dtype=torch.int32)
    paged, _ = E.npu_fused_infer_attention_score(
        q[[2, 6]].contiguous(), cache.view(4, 128, 256), cache.view(4, 128, 256), block_table=table,
        block_size=128,
        actual_seq_lengths=[1, 2], actual_seq_lengths_kv=[3, 4], atten_mask=MASK, sparse_mode=3,
        num_heads=2, input_layout="TND", scale=0.125)
    assert torch.allclose(paged.float(), out[[2, 6]].float(), atol=1e-2)


def test_fia_rejects_what_the_real_op_rejects():
    q, k = rnd(1, 4, 2, 64), rnd(1, 4, 2, 64)
    cases = {
        "query dtype": dict(query=q.float(), key=k.float(), value=k.float(), num_heads=2,
                            input_layout="BSND"),
        r"needs atten_mask of shape \(2048, 2048\)": dict(query=q, key=k, value=k, num_heads=2,
                                                          input_layout="BSND", sparse_mode=3,
                                    atten_mask=torch.ones(4, 4, dtype=torch.bool).triu(1)),
        "num_heads says 4": dict(query=q, key=k, value=k, num_heads=4, input_layout="BSND"),
        "must be contiguous": dict(query=q.transpose(1, 2), key=k, value=k, num_heads=4, input_layout="BSND"),
        "TND needs head dim": dict(query=rnd(4, 2, 32), key=rnd(4, 2, 32), value=rnd(4, 2, 32), num_heads=2,
                                   input_layout="TND", actual_seq_lengths=[4], actual_seq_lengths_kv=[4]),
        "non-decreasing": dict(query=rnd(4, 2, 128), key=rnd(4, 2, 128), value=rnd(4, 2, 128), num_heads=2,
                               input_layout="TND", actual_seq_lengths=[3, 1], actual_seq_lengths_kv=[3, 4]),
        "block_table dtype": dict(query=rnd(2, 2, 128), key=rnd(2, 128, 256), value=rnd(2, 128, 256),
                                  num_heads=2,
                                  input_layout="TND", actual_seq_lengths=[1, 2], actual_seq_lengths_kv=[5, 5],
                                  block_table=torch.zeros(2, 1, dtype=torch.int64), block_size=128),
        "multiple of 128": dict(query=rnd(1, 4, 2, 64), key=rnd(2, 64, 128), value=rnd(2, 64, 128), num_heads=2,
                                input_layout="BSND", actual_seq_lengths_kv=[5],
                                block_table=torch.zeros(1, 1, dtype=torch.int32), block_size=64),
    }
    for what, kwargs in cases.items():
        with pytest.raises(EmulatedOpError, match=what):
            E.npu_fused_infer_attention_score(**kwargs)
    with pytest.raises(TypeError, match="unexpected keyword argument 'scale_value'"):
        E.npu_fused_infer_attention_score(q, k, k, num_heads=2, input_layout="BSND", scale_value=0.1)
    with pytest.raises(NotEmulatedError):
        E.npu_fused_infer_attention_score(q, k, k, num_heads=2, input_layout="BSND", pse_shift=q)


def test_fully_masked_rows_are_undefined_unless_inner_precise_corrects_them():
    q, k = rnd(1, 3, 1, 64), rnd(1, 3, 1, 64)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[1] = True
    raw, _ = E.npu_fused_infer_attention_score(q, k, k, atten_mask=mask, num_heads=1, input_layout="BSND")
    fixed, _ = E.npu_fused_infer_attention_score(q, k, k, atten_mask=mask, num_heads=1, input_layout="BSND",
                                                 inner_precise=2)
    assert torch.isnan(raw[0, 1]).all() and not torch.isnan(raw[0, 0]).any()
    assert torch.equal(fixed[0, 1], torch.zeros_like(fixed[0, 1]))


def test_norms_rope_swiglu_match_formulas_and_reject_bad_calls():
    x, w = rnd(3, 16, dtype=torch.float32), rnd(16, dtype=torch.float32)
    y, rstd = E.npu_rms_norm(x, w, 1e-6)
    assert torch.allclose(y, x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w, atol=1e-5)
    assert rstd.shape == (3, 1) and rstd.dtype == torch.float32
    with pytest.raises(EmulatedOpError, match="dtypes must be one of"):
        E.npu_rms_norm(x, w.bfloat16())
    y2, _, total = E.npu_add_rms_norm(x, 2 * x, w)
    assert torch.allclose(total, 3 * x) and torch.allclose(y2, E.npu_rms_norm(3 * x, w)[0], atol=1e-5)
    qr = rnd(1, 2, 3, 8, dtype=torch.float32)
    cos, sin = rnd(1, 2, 1, 8, dtype=torch.float32).tanh(), rnd(1, 2, 1, 8, dtype=torch.float32).tanh()
    half = torch.cat((-qr[..., 4:], qr[..., :4]), -1)
    assert torch.allclose(E.npu_rotary_mul(qr, cos, sin), qr * cos + half * sin)
    with pytest.raises(EmulatedOpError, match="r1 dtype"):
        E.npu_rotary_mul(qr, cos.bfloat16(), sin)
    a = rnd(4, 10, dtype=torch.float32)
    assert torch.allclose(E.npu_swiglu(a), F.silu(a[:, :5]) * a[:, 5:])
    with pytest.raises(EmulatedOpError, match="contiguous"):
        E.npu_swiglu(a.t())
    with pytest.raises(EmulatedOpError, match="even"):
        E.npu_swiglu(rnd(4, 9))


def test_scatter_and_top_k_top_p_reject_bad_calls():
    kv, cache = rnd(2, 1, 64), torch.zeros(1, 128, 1, 64, dtype=torch.bfloat16)
    with pytest.raises(EmulatedOpError, match="unique"):
        E.npu_scatter_pa_kv_cache(kv, kv, cache, cache.clone(), torch.tensor([3, 3]), cache_mode="Norm")
    with pytest.raises(NotEmulatedError, match="PA_NZ"):
        E.npu_scatter_pa_kv_cache(kv, kv, cache, cache.clone(), torch.tensor([0, 1]))
    logits = rnd(2, 2000, dtype=torch.float32)
    with pytest.raises(EmulatedOpError, match=r"k must be in \[1, 1024\]"):
        E.npu_top_k_top_p(logits, k=torch.tensor([2000, 3], dtype=torch.int32))
    with pytest.raises(EmulatedOpError, match="both be None"):
        E.npu_top_k_top_p(logits)
    kept = E.npu_top_k_top_p(logits, p=torch.tensor([0.0, 1.0]), k=torch.tensor([5, 1], dtype=torch.int32))
    assert torch.isfinite(kept).sum(-1).tolist() == [1, 1]
    assert int(kept[0].argmax()) == int(logits[0].argmax())
