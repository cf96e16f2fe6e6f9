"""The whole model on the emulated NPU == the float32 CPU reference (tiny synthetic checkpoints)."""
from __future__ import annotations

import math

import pytest
import torch

import hal
from hal.ops import model_nmse_bound
from npu_metrics import nmse

PROMPTS = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3, 64, 128, 256, 11, 12, 13, 14, 15],
                        [900, 2, 33, 44, 55, 66, 77, 88, 99, 110, 121, 132, 143, 154, 165, 176]])


def _top1(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def _compare(path, monkeypatch) -> tuple[float, float, float, dict[str, str]]:
    reference = hal.load_model(path, "cpu", "float32", reference=True)
    cpu_bf16 = hal.load_model(path, "cpu", "bfloat16")
    monkeypatch.setenv("HAL_NPU_EMULATE", "1")
    npu = hal.load_model(path, "npu")
    ref = reference.logits(PROMPTS)
    got, base = npu.logits(PROMPTS), cpu_bf16.logits(PROMPTS)
    agree = float((_top1(got) == _top1(ref)).float().mean())
    return nmse(ref, got), nmse(ref, base), agree, npu.bound_ops


# FIA's layout follows the head dim: TND for 128, BSND for 64 (TND's docs do not give it) and 32
LAYOUTS = {"d128": "npu.torch_npu", "d64": "npu.torch_npu_bsnd", "tiny": "npu.torch_npu_bsnd"}


@pytest.mark.parametrize("which", sorted(LAYOUTS))
def test_model_logits_match_reference(emulated, monkeypatch, request, which):
    path = request.getfixturevalue(f"{which}_checkpoint")
    err, baseline, agree, bound = _compare(path, monkeypatch)
    assert bound["attention_prefill"] == LAYOUTS[which] and bound["rms_norm"] == "npu.torch_npu"
    # bf16 through the NPU path must be as close to the fp32 judge as bf16 on the CPU path
    assert err <= model_nmse_bound("bfloat16", baseline), f"NPU NMSE {err:.2e} vs CPU bf16 NMSE {baseline:.2e}"
    assert err < 1e-3 and agree >= 0.9, f"NMSE {err:.2e}, top-1 agreement {agree:.2f}"


@pytest.mark.parametrize("which", ["d64", "d128"])
def test_decode_path_with_left_padding_matches_reference(emulated, request, which):
    """Prefill + 4 single-token decode steps through the KV cache (attention_decode on FIA with
    a block table, BSND for head_dim 64, TND for 128), batch 2 with left padding, against the
    reference without a cache."""
    path = request.getfixturevalue(f"{which}_checkpoint")
    reference = hal.load_model(path, "cpu", "float32", reference=True)
    npu = hal.load_model(path, "npu")
    assert npu.device == torch.device("cpu") and npu.bound_ops["attention_decode"] == LAYOUTS[which]
    ids, starts = PROMPTS.clone(), torch.tensor([0, 5])
    cache = npu.new_cache(2, 24)
    got = [npu.forward(ids[:, :12], cache=cache, kv_start=starts).logits[:, -1]]
    for t in range(12, 16):
        got.append(npu.forward(ids[:, t:t + 1], cache=cache, kv_start=starts).logits[:, -1])
    full = reference.forward(ids, kv_start=starts).logits[:, 11:]
    got = torch.stack(got, dim=1).float()
    err = nmse(full, got)
    assert err < 1e-3 and bool((got.argmax(-1) == full.argmax(-1)).float().mean() >= 0.9), f"NMSE {err:.2e}"


def _reference_continuation(reference, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """The float32 reference's next-token logits before each of ``tokens`` (no cache)."""
    seq = torch.tensor([prompt + tokens])
    logits = reference.logits(seq)[0]
    return [logits[len(prompt) - 1 + i] for i in range(len(tokens))]


def _nucleus(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> tuple[set[int], float]:
    """The tokens hal/ops.py's sample contract may draw, and how close the top-p cut came to a token."""
    probs = torch.softmax(logits.double() / temperature, -1)
    values, order = probs.sort(descending=True)
    values = values[:top_k] / values[:top_k].sum()
    before = values.cumsum(0) - values
    keep = int((before < top_p).sum())
    return set(order[:keep].tolist()), float((before - top_p).abs().min())


def test_generate_on_the_emulated_npu_follows_the_reference(emulated, d64_checkpoint):
    """float32 on the emulated NPU (its sampler and norm wrappers): greedy tokens are the float32
    reference's argmax (recomputed without a cache); sampled tokens lie in the reference's top-k /
    top-p set at every step (its distribution: tests/test_sampling_distribution.py)."""
    reference = hal.load_model(d64_checkpoint, "cpu", "float32", reference=True)
    npu = hal.load_model(d64_checkpoint, "npu", "float32")
    assert npu.bound_ops["sample"] == "npu.torch_npu"
    prompts = [[5, 17, 300], [900, 2, 33, 44, 55]]
    greedy = npu.generate(prompts, max_new_tokens=4, do_sample=False, eos_token_id=-1)
    for prompt, tokens in zip(prompts, greedy):
        steps = _reference_continuation(reference, prompt, tokens)
        assert tokens == [int(step.argmax()) for step in steps]
    settings = {"temperature": 0.8, "top_k": 20, "top_p": 0.9}
    sampled = npu.generate(prompts, max_new_tokens=6, do_sample=True, seed=3, eos_token_id=-1, **settings)
    assert [row[:4] for row in sampled] != greedy
    for prompt, tokens in zip(prompts, sampled):
        for i, step in enumerate(_reference_continuation(reference, prompt, tokens)):
            allowed, gap = _nucleus(step, **settings)
            assert gap > 1e-4, "a top-p cut too close to call in float32"
            assert tokens[i] in allowed, f"step {i}: token {tokens[i]} outside the reference's nucleus {allowed}"


def test_bfloat16_generate_is_repeatable_and_finite(emulated, d64_checkpoint):
    npu = hal.load_model(d64_checkpoint, "npu")
    out = npu.generate([[5, 17, 300], [900, 2, 33, 44, 55]], max_new_tokens=5, do_sample=True, seed=3,
                       temperature=0.8, top_k=20, top_p=0.9)
    again = npu.generate([[5, 17, 300], [900, 2, 33, 44, 55]], max_new_tokens=5, do_sample=True, seed=3,
                         temperature=0.8, top_k=20, top_p=0.9)
    assert out == again and all(len(row) >= 1 for row in out)
    assert math.isfinite(float(npu.logits(PROMPTS[:, :4]).sum()))
