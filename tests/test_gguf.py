"""The trained fixture (SmolLM2-135M-Instruct, llama.cpp Q4_1 GGUF, architecture ``llama``) loaded
straight from its GGUF, judged against transformers' own GGUF loading (``from_pretrained(...,
gguf_file=...)``, an independent reader, dequantizer and model) and against facts of the model
card (the issue's shapes, the ChatML template, "Paris")."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import hal
from hal.ops import get_spec
from model.tokenizer import render_chat

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "Einstein is known for the theory of",
)
TEXTS = (
    "Hello world",
    " leading space",
    "trailing spaces   ",
    "two  spaces and\ttabs\t\tand\nnewlines\n\n",
    "digits 0 12 345 2024 3.14159 1,000,000",
    "CJK 中文字符 日本語 한국어",
    "emoji 🚀🦙 and accents: café naïve Ærøskøbing",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "code: for (int i = 0; i < n; ++i) { x[i] = y[i] * 2; }",
    "I've been 'told' he's there, 'RE you sure? We'Ve a'lL",
    "",
)
MESSAGES = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a prime."}],
)


@pytest.fixture(scope="module")
def ours(trained_gguf):
    return hal.load_model(trained_gguf, "cpu", "float32")


@pytest.fixture(scope="module")
def hf_model_float64(trained_gguf):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(trained_gguf.parent, gguf_file=trained_gguf.name,
                                                     dtype=torch.float64)
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(trained_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(trained_gguf.parent, gguf_file=trained_gguf.name)


def test_config_from_metadata_is_smollm2_as_a_neutral_minicpm(ours):
    c = ours.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
    assert c.rope_theta == 100000.0 and c.rope_scaling is None and c.tie_word_embeddings
    # neutral μP: a Llama
    assert c.scale_emb == 1.0 and c.residual_scale == 1.0 and c.logit_scale == 1.0
    assert c.rms_norm_eps == 1e-5


def test_float32_logits_equal_transformers_gguf_loading(ours, hf_model_float64, hf_tokenizer):
    """Against transformers' model in float64 (its own reader and dequantizer; float64: the exact answer
    for these weights, so the bound measures our float32 error, not the difference of two float32 sum
    orders), within the float32 ``logits`` contract. Measured on this fixture: NMSE 4.8e-12 at most
    (transformers' own float32 forward 1.4e-12; our float32 reference model 4.0e-12); a max-|difference|
    bound against transformers in float32 sat at float32's reordering noise (1.2e-4 with oneDNN's sums,
    1.1e-4 with F.linear's, 3.4e-5 with MKL's pre-transposed GEMM, on logits of magnitude 30)."""
    bound = get_spec("logits").tolerance("float32")
    for prompt in PROMPTS:
        ids = torch.tensor([hf_tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            expected = hf_model_float64(input_ids=ids).logits
        got = ours.logits(ids)
        assert got.shape == expected.shape
        error = float(((got.double() - expected) ** 2).mean() / (expected ** 2).mean())
        assert error <= bound, f"{prompt!r}: NMSE {error:.3g} against transformers in float64 (bound {bound:g})"


def test_tokenizer_equals_transformers_gguf_tokenizer(ours, hf_tokenizer):
    tok = ours.tokenizer
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == hf_tokenizer(text)["input_ids"], repr(text)
        assert tok.decode(ids) == hf_tokenizer.decode(ids), repr(text)
        assert tok.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (hf_tokenizer.bos_token, hf_tokenizer.eos_token,
                                                            hf_tokenizer.pad_token)


def test_chat_template_renders_like_transformers(ours, hf_tokenizer):
    for messages in MESSAGES:
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_chat(ours.tokenizer, messages) == expected
    # SmolLM2's template: ChatML with a default system turn
    assert render_chat(ours.tokenizer, MESSAGES[0]).startswith("<|im_start|>system\n")


def test_greedy_chat_answer_names_paris(ours):
    tok = ours.tokenizer
    prompt = render_chat(tok, [{"role": "user", "content": "What is the capital of France?"}])
    out = ours.generate([tok(prompt)["input_ids"]], max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0], skip_special_tokens=True)


def test_convert_round_trip_gives_identical_logits(ours, trained_gguf, tmp_path):
    from model.convert import main

    out = tmp_path / "smollm2"
    assert main([str(trained_gguf), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == ours.tokenizer.chat_template
    converted = hal.load_model(out, "cpu", "float32")
    assert converted.config.raw == {**ours.config.raw, "torch_dtype": "float32"}
    for text in PROMPTS + TEXTS[:8]:
        ids = ours.tokenizer(text)["input_ids"]
        assert converted.tokenizer(text)["input_ids"] == ids, repr(text)
    ids = torch.tensor([ours.tokenizer(PROMPTS[0])["input_ids"]])
    assert torch.equal(converted.logits(ids), ours.logits(ids))
    messages = MESSAGES[1]
    assert render_chat(converted.tokenizer, messages) == render_chat(ours.tokenizer, messages)
    del converted
    shutil.rmtree(out)  # 540 MB: not kept in pytest's last three temp dirs
