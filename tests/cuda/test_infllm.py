"""cuda.triton InfLLM-v2: the stage-1 kernel scores against a float64 computation written here,
the selected blocks and block-sparse attention against the float32 references, for GQA ratios
1/2/3/4/8/16 (the official CUDA kernel handles 16 only), head_dim 32/64/128, odd lengths, batch > 1,
decode and prefill."""
from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE, assert_matches_reference, cases

from backends.cuda.infllm import block_sparse_attention_triton, infllm_select_blocks_triton, kernel_scores_triton
from hal.sparse import InfLLMGeometry
from validation.grid import SMALL_GEOMETRY
from validation.opcheck import geometry_dims, make_inputs, case

SMALL, REAL = geometry_dims(SMALL_GEOMETRY), geometry_dims(InfLLMGeometry())


def scores_float64(q, kernels, coarse, kv_lens, g: InfLLMGeometry, scale):
    """The stage-1 sentences of hal/ops.py in float64: `[B, Hk, T, N1]`."""
    batch, new, heads, _ = q.shape
    kv_heads = kernels.shape[2]
    group = heads // kv_heads
    q, kernels, coarse = q.double(), kernels.double().nan_to_num(), coarse.double().nan_to_num()
    out = torch.zeros(batch, kv_heads, new, kernels.shape[1], dtype=torch.float64)
    for b in range(batch):
        for t in range(new):
            p = int(kv_lens[b]) - new + t
            fine = [j for j in range(kernels.shape[1]) if j * g.kernel_stride + g.kernel_size - 1 <= p]
            rough = [j for j in range(coarse.shape[1]) if j * g.coarse_stride + g.coarse_size - 1 <= p]
            if not fine:
                continue
            for h in range(heads):
                kh = h // group
                norm = coarse[b, rough, kh] if rough else kernels[b, fine, kh]
                lse = torch.logsumexp(norm @ q[b, t, h] * scale, dim=0)
                out[b, kh, t, fine] += torch.exp(kernels[b, fine, kh] @ q[b, t, h] * scale - lse)
    return out


SCORE_CASES = [(dims, flags) for dims, flags in [
    ({"B": 1, "T": 1, "S": 300, "C": 384, "H": 4, "Hk": 4, "D": 64, **SMALL}, ()),
    ({"B": 1, "T": 3, "S": 150, "C": 256, "H": 4, "Hk": 2, "D": 64, **SMALL}, ()),
    ({"B": 2, "T": 40, "S": 90, "C": 128, "H": 6, "Hk": 2, "D": 64, **SMALL}, ("ragged",)),  # G = 3, fallback LSE
    ({"B": 1, "T": 5, "S": 301, "C": 384, "H": 8, "Hk": 2, "D": 128, **SMALL}, ()),
    ({"B": 1, "T": 2, "S": 250, "C": 256, "H": 16, "Hk": 2, "D": 64, **SMALL}, ()),
    ({"B": 2, "T": 3, "S": 200, "C": 256, "H": 16, "Hk": 1, "D": 64, **SMALL}, ("ragged",)),
    ({"B": 1, "T": 1, "S": 1200, "C": 1280, "H": 32, "Hk": 2, "D": 128, **REAL}, ()),
]]


@pytest.mark.parametrize("c", cases("infllm_select_blocks", SCORE_CASES))
def test_stage1_scores_match_float64(c):
    args = make_inputs(c)
    expected = scores_float64(args["q"], args["kernels"], args["coarse"], args["kv_lens"], args["geometry"],
                              args["scale"])
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[c.dtype]
    placed = {k: v.to(DEVICE, dtype) if k in ("q", "kernels", "coarse") else v for k, v in args.items()}
    got = kernel_scores_triton(placed["q"], placed["kernels"], placed["coarse"], args["kv_lens"].to(DEVICE),
                               args["geometry"], args["scale"]).double().cpu()
    # inputs are already rounded to the case dtype: only float32 accumulation order differs
    err = float(((got - expected) ** 2).sum() / (expected ** 2).sum())
    assert err <= 1e-10, f"{c.label}: NMSE {err:.2e}"
    assert (got[expected == 0] == 0).all()  # invisible kernels score exactly 0


@pytest.mark.parametrize("c", cases("infllm_select_blocks", SCORE_CASES[:6]))
def test_selected_blocks_match_reference(c):
    assert_matches_reference(c, infllm_select_blocks_triton)


ATTENTION_CASES = [
    ({"B": 1, "T": 1, "S": 300, "C": 384, "H": 4, "Hk": 2, "D": 64, **SMALL}, ()),
    ({"B": 2, "T": 2, "S": 200, "C": 256, "H": 16, "Hk": 1, "D": 64, **SMALL}, ("ragged",)),
    ({"B": 1, "T": 9, "S": 100, "C": 128, "H": 6, "Hk": 2, "D": 32, **SMALL}, ()),  # prefill chunk, G = 3, D 32
    # decode over the 8B geometry: the 96-entry block list split over 24 programs, most see only -1
    ({"B": 1, "T": 1, "S": 700, "C": 768, "H": 16, "Hk": 2, "D": 128, **REAL}, ()),
]


@pytest.mark.parametrize("c", cases("block_sparse_attention", ATTENTION_CASES))
def test_block_sparse_attention_matches_reference(c):
    assert_matches_reference(c, block_sparse_attention_triton)


def test_block_size_must_suit_the_kernel():
    c = case("block_sparse_attention", "float32", (), B=1, T=1, S=50, C=128, H=4, Hk=2, D=64, **SMALL)
    args = make_inputs(c)
    args["block_size"] = 24
    with pytest.raises(ValueError, match="block_size must be a power of two >= 16, got 24"):
        block_sparse_attention_triton(**args)
