"""MiniCPM-SALA (tiny-sala preset: layers S L L S) against an independent float64 forward
(tests/sala_reference.py), config validation, the cache (lightning states) and the sparse
switch, and the emulated NPU with a decode graph."""
from __future__ import annotations

import pytest
import torch
from sala_reference import sala_logits

import hal
from hal.errors import ConfigError
from model.config import parse_config
from model.synthetic import _config, write_checkpoint

PROMPT = [(37 * i) % 1000 + 3 for i in range(100)]


@pytest.fixture(scope="module")
def sala(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("sala") / "tiny-sala", "tiny-sala", dtype="float32")


@pytest.fixture(scope="module")
def sala_all_blocks(tmp_path_factory):
    """Sparse layers go sparse from 64 tokens, with a budget that selects every block (= dense)."""
    sparse = dict(_config("tiny-sala")["sparse_config"], topk=1000)
    return write_checkpoint(tmp_path_factory.mktemp("sala") / "all", "tiny-sala", dtype="float32",
                            overrides={"sparse_config": sparse})


@pytest.mark.parametrize("length", [40, 100])
def test_logits_match_an_independent_float64_forward(sala_all_blocks, length):
    model = hal.load_model(sala_all_blocks, "cpu", "float32")
    assert [layer.mixer for layer in model.layers] == ["attention", "lightning", "lightning", "attention"]
    ours = model.logits(torch.tensor([PROMPT[:length]]))[0].double()
    ref = sala_logits(sala_all_blocks, PROMPT[:length])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("mixer_types", ["minicpm4", "mamba", "lightning", "minicpm4"], "entry 1 must be 'minicpm4' or 'lightning-attn'"),
    ("mixer_types", ["minicpm4"], "must be a list of num_hidden_layers=4 names"),
    ("lightning_nkv", 2, "must equal lightning_nh=4 (lightning layers have no GQA)"),
    ("lightning_scale", "1/d^2", "must be one of 1/sqrt(d), 1/d"),
    ("lightning_layerwise_decay", True, "not supported"),
])
def test_bad_sala_fields_name_the_field(field, value, message):
    data = _config("tiny-sala")
    data[field] = value
    with pytest.raises(ConfigError, match=f"field '{field}' .*" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(data)


def test_cache_carries_lightning_states_and_equals_recompute(sala):
    """Batch 2 with left padding, crossing dense_len (64) during generation."""
    model = hal.load_model(sala, "cpu", "float32")
    cache = model.new_cache(2, 16)
    assert cache.keys[1] is None and cache.states[1].shape == (2, 4, 32, 32) and cache.keys[0] is not None
    prompts = [PROMPT[:50], PROMPT[3:30]]
    cached = model.generate(prompts, max_new_tokens=24, do_sample=False, eos_token_id=-1)
    recomputed = model.generate(prompts, max_new_tokens=24, do_sample=False, eos_token_id=-1, use_cache=False)
    assert cached == recomputed


def test_bfloat16_is_close_to_the_float32_reference_ops(sala):
    reference = hal.load_model(sala, "cpu", "float32", reference=True)
    bf16 = hal.load_model(sala, "cpu", "bfloat16")
    ids = torch.tensor([PROMPT[:80]])
    ref, got = reference.logits(ids), bf16.logits(ids)
    agree = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    err = float(((ref - got) ** 2).sum() / (ref ** 2).sum())
    assert err < 1e-3 and agree > 0.9, (err, agree)


def test_emulated_npu_with_decode_graph_equals_eager(sala, monkeypatch):
    from backends.npu import emulator
    from hal.probing import reset

    monkeypatch.setenv("HAL_NPU_EMULATE", "1")
    reset()
    try:
        npu = hal.load_model(sala, "npu", "bfloat16")
        assert npu.bound_ops["lightning_attention"] == "npu.torch"
        eager = npu.generate([PROMPT[:50]], max_new_tokens=20, do_sample=False, eos_token_id=-1)
        graphed = npu.generate([PROMPT[:50]], max_new_tokens=20, do_sample=False, eos_token_id=-1,
                               decode_graph=True)
        assert graphed == eager
    finally:
        emulator.uninstall()
        reset()


def test_alibi_slopes_are_salas_table():
    from model.slopes import alibi_slopes

    # research/sala_spec.md §5.2: s_h = 2^(-(h+1)/4) for 32 heads
    table = {0: 0.8409, 1: 0.7071, 3: 0.5, 7: 0.25, 15: 0.0625, 23: 0.0156, 31: 0.0039}
    slopes = alibi_slopes(32)
    assert all(abs(float(slopes[h]) - s) < 1e-4 for h, s in table.items())
    # ALiBi for 6 heads: the 4-head slopes, then every other one of the 8-head list
    assert alibi_slopes(6).tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]


def test_a_cache_not_made_for_the_model_is_refused_in_one_line(sala):
    from hal.errors import InputError
    from model.cache import KVCache

    model = hal.load_model(sala, "cpu", "float32")
    cfg = model.config
    cache = KVCache(cfg.num_hidden_layers, 1, 32, cfg.num_key_value_heads, cfg.head_dim, model.dtype, model.device)
    with pytest.raises(InputError, match="not made for this model.*model.new_cache"):
        model.forward(torch.tensor([PROMPT[:5]]), cache=cache)


def test_a_failed_capture_leaves_the_lightning_states_as_they_were(sala, monkeypatch):
    from backends.npu import emulator
    from hal.probing import reset
    from model.decode_graph import DecodeGraph

    monkeypatch.setenv("HAL_NPU_EMULATE", "1")
    reset()
    try:
        npu = hal.load_model(sala, "npu", "float32")
        cache = npu.new_cache(1, 64)
        npu.forward(torch.tensor([PROMPT[:30]]), cache=cache)
        before = {i: s.clone() for i, s in cache.states.items()}
        graph = DecodeGraph(npu, cache)

        def broken(_graph):
            raise RuntimeError("capture failed")

        monkeypatch.setattr(graph.runtime.__class__, "capture", lambda self, g: broken(g))
        with pytest.raises(RuntimeError, match="capture failed"):
            graph.step(torch.tensor([5]))
        assert all(torch.equal(cache.states[i], before[i]) for i in before)
    finally:
        emulator.uninstall()
        reset()
