"""Independent check of our float32 model against transformers' ``LlamaForCausalLM``.

The same synthetic safetensors are loaded into Llama with MiniCPM's μP scalars folded into the
weights and LongRoPE mapped onto transformers' ``longrope`` (see ``benchmarks/hf_llama.py``).
Our logits, through both the everyday CPU ops and the float32 reference ops, must match within
1e-4; greedy generation must agree with and without the KV cache, alone and batched, and with
transformers' own ``generate``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import hal
from benchmarks.hf_llama import load_folded_llama, minicpm_rope

TOL = 1e-4
NEW_TOKENS = 12


def _prompts(vocab: int) -> list[list[int]]:
    """Deterministic prompts: short ones and two longer ones (one past 2 KV-cache growth steps)."""
    g = torch.Generator().manual_seed(1234)
    lengths = (1, 3, 7, 45, 300)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def untied_checkpoint(tmp_path_factory) -> Path:
    from model.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-untied", "tiny", seed=3,
                            overrides={"tie_word_embeddings": False})


@pytest.fixture(scope="module", params=["tied", "untied"])
def variant(request, tiny_checkpoint, untied_checkpoint):
    """(checkpoint, our fast float32 model, our reference model, folded transformers Llama)."""
    path = tiny_checkpoint if request.param == "tied" else untied_checkpoint
    fast = hal.load_model(path, device="cpu", dtype="float32")
    reference = hal.load_model(path, device="cpu", dtype="float32", reference=True)
    llama = load_folded_llama(path, torch.float32)
    return path, fast, reference, llama


def test_variant_config_is_what_we_think(variant) -> None:
    """The tiny preset exercises non-trivial LongRoPE (long factors, mscale != 1) and GQA."""
    path, fast, _, llama = variant
    cfg = json.loads((Path(path) / "config.json").read_text())
    scaling = cfg["rope_scaling"]
    assert cfg["max_position_embeddings"] > scaling["original_max_position_embeddings"]
    factors, mscale = minicpm_rope(cfg)
    assert factors == scaling["long_factor"]
    assert any(abs(f - 1.0) > 1e-3 for f in factors), "LongRoPE factors are all 1: the check is trivial"
    assert factors != scaling["short_factor"], "long == short factors: the factor choice is untested"
    expected_mscale = math.sqrt(1 + math.log(cfg["max_position_embeddings"]
                                             / scaling["original_max_position_embeddings"])
                                / math.log(scaling["original_max_position_embeddings"]))
    assert mscale == pytest.approx(expected_mscale) and abs(mscale - 1.0) > 1e-3
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert cfg["scale_emb"] != 1 and cfg["scale_depth"] != 1 and cfg["dim_model_base"] != cfg["hidden_size"]
    # transformers really runs the LongRoPE we meant (not its short-factor default)
    assert llama.model.rotary_emb.attention_scaling == pytest.approx(mscale)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    base = cfg["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    expected_inv = 1.0 / (torch.tensor(factors) * base)
    torch.testing.assert_close(llama.model.rotary_emb.inv_freq, expected_inv)
    torch.testing.assert_close(fast.rope.inv_freq, expected_inv)
    assert fast.rope.mscale == pytest.approx(mscale)
    assert (cfg["tie_word_embeddings"] is False) == (fast.lm_head is not fast.embed)


@pytest.mark.parametrize("ops", ["fast", "reference"])
def test_logits_match_transformers(variant, ops: str) -> None:
    _, fast, reference, llama = variant
    model = fast if ops == "fast" else reference
    for prompt in _prompts(model.config.vocab_size):
        ids = torch.tensor([prompt])
        ours = model.logits(ids)
        with torch.no_grad():
            theirs = llama(ids).logits.float()
        assert ours.shape == theirs.shape == (1, len(prompt), model.config.vocab_size)
        diff = (ours - theirs).abs().max().item()
        assert diff <= TOL, f"{ops} ops, prompt of {len(prompt)} tokens: max |Δlogit| = {diff:.3g}"
        assert theirs.std().item() > 0.1  # the logits are not degenerate


def test_logits_match_transformers_batched(variant) -> None:
    """A [2, T] batch (no padding) through the fast ops, against transformers."""
    _, fast, _, llama = variant
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, fast.config.vocab_size, (2, 33), generator=g)
    with torch.no_grad():
        theirs = llama(ids).logits.float()
    assert (fast.logits(ids) - theirs).abs().max().item() <= TOL


def test_greedy_cache_batch_and_transformers_agree(variant) -> None:
    _, fast, _, llama = variant
    prompts = _prompts(fast.config.vocab_size)[1:4]  # 3, 7 and 45 tokens
    no_eos: list[int] = []
    alone = [fast.generate([p], NEW_TOKENS, do_sample=False, eos_token_id=no_eos)[0] for p in prompts]
    for prompt, tokens in zip(prompts, alone):
        assert len(tokens) == NEW_TOKENS
        uncached = fast.generate([prompt], NEW_TOKENS, do_sample=False, eos_token_id=no_eos, use_cache=False)
        assert uncached[0] == tokens, "greedy with KV cache != greedy without"
        with torch.no_grad():
            out = llama.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
        assert out[0, len(prompt):].tolist() == tokens, "our greedy tokens != transformers' greedy tokens"
    assert len(set(map(tuple, alone))) > 1  # prompts lead to different continuations
    # batches of prompts of different lengths (left padding) == each prompt alone, cached or not
    pair = [prompts[0], prompts[2]]
    for use_cache in (True, False):
        batched = fast.generate(pair, NEW_TOKENS, do_sample=False, eos_token_id=no_eos, use_cache=use_cache)
        assert batched == [alone[0], alone[2]], f"batch of 2 (use_cache={use_cache}) != each prompt alone"


def test_long_prompt_past_original_context(tiny_checkpoint) -> None:
    """2100 tokens (> original_max_position_embeddings = 2048): transformers' own longrope code now
    takes its long-factor branch; MiniCPM (and we) use the same long set throughout.

    Float32 rounding of inv_freq differs by an ulp between formulas (ours: inv_freq / ext,
    transformers: 1 / (ext * base^x)); at position ~2000 that is ~1e-4 rad of angle, so the
    plain comparison gets 5e-4. With transformers given our inv_freq (same angles), the rest of
    the model must agree within 1e-4 at these long positions too."""
    fast = hal.load_model(tiny_checkpoint, device="cpu", dtype="float32")
    llama = load_folded_llama(tiny_checkpoint, torch.float32)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, fast.config.vocab_size, (1, 2100), generator=g)
    ours = fast.logits(ids)
    with torch.no_grad():
        theirs = llama(ids).logits.float()
    assert (ours - theirs).abs().max().item() <= 5e-4
    rotary = llama.model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq, fast.rope.inv_freq, rtol=3e-7, atol=0)  # within ~1 ulp
    rotary.original_inv_freq.copy_(fast.rope.inv_freq)
    rotary.long_inv_freq = fast.rope.inv_freq.clone()
    with torch.no_grad():
        aligned = llama(ids).logits.float()
    assert (ours - aligned).abs().max().item() <= TOL
