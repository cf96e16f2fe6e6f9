"""Generation: greedy/sampling rules, EOS stopping, streaming, seeded determinism."""
from __future__ import annotations

import pytest
import torch

import hal
from backends.cpu.ops import sample_cpu
from backends.cpu.reference.sample import sample_ref
from hal.errors import InputError

PROBS = torch.tensor([0.05, 0.4, 0.3, 0.15, 0.1])


def _frequencies(sampler, top_k: int, top_p: float, draws: int = 6000) -> torch.Tensor:
    logits = PROBS.log()[None].repeat(draws, 1)
    gen = torch.Generator().manual_seed(0)
    picks = sampler(logits, 1.0, top_k, top_p, gen)
    return torch.bincount(picks, minlength=5).float() / draws


@pytest.mark.parametrize("sampler", [sample_ref, sample_cpu], ids=["reference", "cpu"])
@pytest.mark.parametrize("top_k, top_p, expected", [
    (0, 1.0, PROBS),
    (2, 1.0, torch.tensor([0, 0.4, 0.3, 0, 0]) / 0.7),
    (0, 0.75, torch.tensor([0, 0.4, 0.3, 0.15, 0]) / 0.85),  # 0.4+0.3 < 0.75: the third is needed
    (0, 0.7, torch.tensor([0, 0.4, 0.3, 0, 0]) / 0.7),
    (3, 0.5, torch.tensor([0, 0.4, 0.3, 0, 0]) / 0.7),
    # top-k first, renormalised (0.4, 0.3 -> 0.571, 0.429), then top-p on that: 0.571 < 0.6
    (2, 0.6, torch.tensor([0, 0.4, 0.3, 0, 0]) / 0.7),
    (2, 0.55, torch.tensor([0, 1.0, 0, 0, 0])),
])
def test_sampling_distribution(sampler, top_k, top_p, expected):
    freq = _frequencies(sampler, top_k, top_p)
    assert torch.allclose(freq, expected.float(), atol=0.025), freq
    assert torch.all(freq[expected == 0] == 0)


@pytest.mark.parametrize("sampler", [sample_ref, sample_cpu], ids=["reference", "cpu"])
def test_greedy_and_degenerate_sampling(sampler):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampler(logits, 0.0, 0, 1.0, None), logits.argmax(-1))
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(sampler(logits, 0.7, 1, 1.0, gen), logits.argmax(-1))
    assert torch.equal(sampler(logits, 0.7, 0, 1e-6, gen), logits.argmax(-1))


def test_eos_stops_and_streamer_sees_every_token(tiny_model):
    prompt = [[1, 17, 300, 42]]
    greedy = tiny_model.generate(prompt, 6, do_sample=False, eos_token_id=[])
    assert len(greedy[0]) == 6
    stop = greedy[0][2]
    seen: list[tuple[int, int]] = []
    out = tiny_model.generate(prompt, 6, do_sample=False, eos_token_id=stop,
                              streamer=lambda r, t: seen.append((r, t)))
    first_stop = greedy[0].index(stop)
    assert out[0] == greedy[0][:first_stop + 1]
    assert seen == [(0, t) for t in out[0]]


def test_seeded_sampling_is_deterministic_and_varies_with_seed(tiny_model):
    prompt = [[1, 17, 300, 42], [1, 5]]
    a = tiny_model.generate(prompt, 8, do_sample=True, temperature=1.0, seed=11, eos_token_id=[])
    b = tiny_model.generate(prompt, 8, do_sample=True, temperature=1.0, seed=11, eos_token_id=[])
    runs = {str(tiny_model.generate(prompt, 8, do_sample=True, temperature=1.5, seed=s, eos_token_id=[]))
            for s in range(4)}
    assert a == b
    assert len(runs) > 1


def test_generation_config_defaults_are_used(tiny_model):
    assert tiny_model.generation_defaults.do_sample is True
    assert tiny_model.generation_defaults.eos_token_ids == (2, 1016)


def test_bad_generation_arguments(tiny_model):
    with pytest.raises(InputError, match="max_new_tokens"):
        tiny_model.generate([[1, 2]], 0)
    with pytest.raises(InputError, match="top_p"):
        tiny_model.generate([[1, 2]], 2, do_sample=True, top_p=0)
    with pytest.raises(InputError, match="exceeds max_position_embeddings"):
        tiny_model.generate([[1, 2]], 4095)
    with pytest.raises(InputError, match="non-empty"):
        tiny_model.generate([[]], 2)


# MiniCPM4-8B's proportions scaled down: the sparse budget (5 blocks of 16 = 80 keys) is below
# dense_len (128), so a chunk ending between them would attend differently from one prefill
SPARSE_8B_LIKE = {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16, "window_size": 32,
                  "topk": 3, "use_nope": False, "dense_len": 128}


@pytest.mark.parametrize("preset", ["tiny", "tiny-sala", "tiny-sparse"])
def test_chunked_prefill_generates_what_one_prefill_does(tmp_path, preset):
    from model.synthetic import write_checkpoint

    overrides = {"sparse_config": SPARSE_8B_LIKE} if preset == "tiny-sparse" else None
    path = write_checkpoint(tmp_path / preset, preset.removesuffix("-sparse"), overrides=overrides)
    model = hal.load_model(path, "cpu", "float32")
    prompts = [[(37 * i) % 1000 + 3 for i in range(200)], [(11 * i) % 1000 + 5 for i in range(41)]]
    whole = model.generate(prompts, max_new_tokens=6, do_sample=False, eos_token_id=-1, prefill_chunk=0)
    for chunk in (16, 100):
        chunked = model.generate(prompts, max_new_tokens=6, do_sample=False, eos_token_id=-1, prefill_chunk=chunk)
        assert chunked == whole, chunk  # chunk 100 ends between the budget and dense_len
    with pytest.raises(InputError, match="prefill_chunk must be >= 0"):
        model.generate(prompts, 2, prefill_chunk=-1)
