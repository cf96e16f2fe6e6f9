"""Tests of model.tokenizer (loading, chat rendering) and model.synthetic_tokenizer."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hal.errors import CheckpointError, InputError
from model.synthetic_tokenizer import DEMO_PROMPTS, MINICPM_CONTROL_TOKENS, write_tokenizer
from model.tokenizer import CHATML_TEMPLATE, CHATML_THINKING_TEMPLATE, load_tokenizer, render_chat

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
ROUND_TRIP_TEXTS = (
    "你好，世界！",
    "Emoji: 😀👍🏽 and 🇫🇷.",
    "混合 text with 日本語 and Ελληνικά",
    "  leading spaces, double  spaces\tand a tab\nnew line ",
    "Code: def f(x): return x ** 2  # comment",
)


@pytest.fixture(scope="module", params=[512, 1024, 73448])
def tokenizer_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp(f"tok{request.param}")
    write_tokenizer(out, request.param)
    return out, request.param


@pytest.fixture(scope="module")
def thinking_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("thinking")
    write_tokenizer(out, 1024, thinking=True)
    return load_tokenizer(out)


def _rewrite_config(folder: Path, **changes: object) -> None:
    file = folder / "tokenizer_config.json"
    config = json.loads(file.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    file.write_text(json.dumps(config), encoding="utf-8")


def test_writes_the_checkpoint_files(tokenizer_dir: tuple[Path, int]) -> None:
    folder, vocab_size = tokenizer_dir
    assert all((folder / name).is_file() for name in FILES)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "<|im_end|>", "<unk>")
    assert config["pad_token"] is None and config["legacy"] is True
    assert config["tokenizer_class"] == "LlamaTokenizer"
    assert config["clean_up_tokenization_spaces"] is False
    assert config["chat_template"] == CHATML_TEMPLATE
    added = json.loads((folder / "added_tokens.json").read_text(encoding="utf-8"))
    assert added == {tok: vocab_size - 8 + i for i, tok in enumerate(MINICPM_CONTROL_TOKENS)}


@pytest.mark.parametrize("vocab_size", [1024, 73448])
def test_special_token_ids(tmp_path: Path, vocab_size: int) -> None:
    write_tokenizer(tmp_path, vocab_size)
    tok = load_tokenizer(tmp_path)
    assert len(tok) == vocab_size
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert tok.convert_tokens_to_ids(list(MINICPM_CONTROL_TOKENS)) == list(range(vocab_size - 8, vocab_size))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, vocab_size - 8)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is None
    assert set(MINICPM_CONTROL_TOKENS) <= set(tok.all_special_tokens)
    assert tok.convert_ids_to_tokens(3) == "<0x00>" and tok.convert_ids_to_tokens(258) == "<0xFF>"
    if vocab_size == 73448:
        ids = tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>", "<|fim_suffix|>"])
        assert ids == [73440, 73441, 73447]
    for token in MINICPM_CONTROL_TOKENS:
        assert tok.encode(f"a{token}b", add_special_tokens=False).count(tok.convert_tokens_to_ids(token)) == 1


def test_bos_prepended_exactly_once(tokenizer_dir: tuple[Path, int]) -> None:
    tok = load_tokenizer(tokenizer_dir[0])
    ids = tok.encode("The capital of France is")
    assert ids[0] == 1 and ids.count(1) == 1
    assert tok("Hello")["input_ids"][0] == 1
    assert 1 not in tok.encode("The capital of France is", add_special_tokens=False)
    assert ids[1:] == tok.encode("The capital of France is", add_special_tokens=False)


def test_bos_follows_tokenizer_config(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 1024)
    _rewrite_config(tmp_path, add_bos_token=..., add_eos_token=...)
    assert load_tokenizer(tmp_path).encode("hello").count(1) == 1
    _rewrite_config(tmp_path, add_bos_token=False)
    assert 1 not in load_tokenizer(tmp_path).encode("hello")
    _rewrite_config(tmp_path, add_bos_token=True, add_eos_token=True)
    ids = load_tokenizer(tmp_path).encode("hello")
    assert ids[0] == 1 and ids[-1] == 1016 and ids.count(1) == 1


def test_demo_prompts_are_a_few_word_tokens(tokenizer_dir: tuple[Path, int]) -> None:
    tok = load_tokenizer(tokenizer_dir[0])
    for prompt in DEMO_PROMPTS:
        ids = tok.encode(prompt)
        assert ids[0] == 1
        assert len(ids) - 1 <= 8, (prompt, tok.convert_ids_to_tokens(ids))
        assert tok.decode(ids, skip_special_tokens=True) == prompt
        assert tok.decode(ids[1:]) == prompt
    assert tok.convert_ids_to_tokens(tok.encode("The capital of France is", add_special_tokens=False)) == [
        "\u2581The", "\u2581capital", "\u2581of", "\u2581France", "\u2581is",
    ]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_any_text_round_trips(tokenizer_dir: tuple[Path, int], text: str) -> None:
    tok = load_tokenizer(tokenizer_dir[0])
    ids = tok.encode(text)
    assert tok.unk_token_id not in ids
    assert max(ids) < tokenizer_dir[1] - 8
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_render_chat_is_chatml(tokenizer_dir: tuple[Path, int]) -> None:
    tok = load_tokenizer(tokenizer_dir[0])
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi!"},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
    )
    assert render_chat(tok, messages) == expected + "<|im_start|>assistant\n"
    assert render_chat(tok, messages, add_generation_prompt=False) == expected
    assert render_chat(tok, messages, enable_thinking=False) == expected + "<|im_start|>assistant\n"


def test_render_chat_encodes_with_control_tokens(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 73448)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode(render_chat(tok, [{"role": "user", "content": "Hello"}]))
    assert ids[:2] == [1, 73441] and ids.count(1) == 1
    assert ids.count(73441) == 2 and ids.count(73440) == 1
    assert tok.decode(ids, skip_special_tokens=True).split() == ["user", "Hello", "assistant"]


def test_render_chat_falls_back_to_chatml(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 1024)
    _rewrite_config(tmp_path, chat_template=...)
    tok = load_tokenizer(tmp_path)
    assert not tok.chat_template
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    expected = (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chat(tok, messages) == expected


def test_chat_template_jinja_file_wins(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 1024)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}", encoding="utf-8"
    )
    tok = load_tokenizer(tmp_path)
    assert render_chat(tok, [{"role": "user", "content": "x"}]) == "[user]x"


def test_thinking_template(thinking_tokenizer) -> None:
    tok = thinking_tokenizer
    assert tok.chat_template == CHATML_THINKING_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    history = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
    head = history + "<|im_start|>assistant\n"
    assert render_chat(tok, messages, enable_thinking=False) == head + "<think>\n\n</think>\n\n"
    assert render_chat(tok, messages, enable_thinking=True) == head
    assert render_chat(tok, messages) == head
    assert render_chat(tok, messages, add_generation_prompt=False, enable_thinking=False) == history


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "robot", "content": "hi"}], "role 'robot'"),
        ([{"content": "hi"}], "role None"),
        ([{"role": "user"}], "no 'content'"),
        ([{"role": "user", "content": None}], "content must be a string"),
        ([], "empty"),
        ("hello", "list"),
        (["hello"], "must be a dict"),
    ],
)
def test_render_chat_rejects_bad_messages(thinking_tokenizer, messages: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        render_chat(thinking_tokenizer, messages)  # type: ignore[arg-type]


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("name", ["tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"])
def test_malformed_json_names_the_file(tmp_path: Path, name: str) -> None:
    write_tokenizer(tmp_path, 512)
    (tmp_path / name).write_text('{"add_bos_token": true,', encoding="utf-8")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)


def test_invalid_tokenizer_json_names_the_file(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 512)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}', encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_write_is_deterministic(tmp_path: Path) -> None:
    for vocab_size in (512, 73448):
        first, second = tmp_path / f"a{vocab_size}", tmp_path / f"b{vocab_size}"
        write_tokenizer(first, vocab_size)
        write_tokenizer(second, vocab_size)
        for name in FILES:
            assert (first / name).read_bytes() == (second / name).read_bytes(), name
    write_tokenizer(tmp_path / "t", 512, thinking=True)
    thinking_json = (tmp_path / "t" / "tokenizer.json").read_bytes()
    assert thinking_json == (tmp_path / "a512" / "tokenizer.json").read_bytes()


def test_larger_vocab_keeps_the_smaller_ones_merges(tmp_path: Path) -> None:
    write_tokenizer(tmp_path / "s", 1024)
    write_tokenizer(tmp_path / "l", 73448)
    small = json.loads((tmp_path / "s" / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    large = json.loads((tmp_path / "l" / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert large["merges"][: len(small["merges"])] == small["merges"]
    assert len(large["vocab"]) == 73440 and "<|reserved_0|>" in large["vocab"]


@pytest.mark.parametrize("vocab_size", [0, 511, 1024.0, True])
def test_write_rejects_bad_vocab_size(tmp_path: Path, vocab_size: object) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        write_tokenizer(tmp_path, vocab_size)  # type: ignore[arg-type]


def test_sentencepiece_model_fallback(tmp_path: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    lines = [line for prompt in DEMO_PROMPTS for line in (prompt, prompt.lower() + " and more words")] * 4
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "tokenizer"), vocab_size=300,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
    )
    os.remove(tmp_path / "tokenizer.vocab")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 300, "<|im_start|>": 301}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "eos_token": "<|im_end|>",
        "chat_template": CHATML_TEMPLATE,
    }))
    tok = load_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert len(tok) == 302 and tok.eos_token_id == 300 and tok.bos_token_id == sp.bos_id()
    for text in DEMO_PROMPTS + ROUND_TRIP_TEXTS:
        ids = tok.encode(text)
        assert ids[0] == sp.bos_id() and ids[1:] == sp.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == text
    chat = render_chat(tok, [{"role": "user", "content": "Hi"}])
    assert tok.encode(chat, add_special_tokens=False).count(301) == 2


def test_bad_sentencepiece_model_names_the_file(tmp_path: Path) -> None:
    pytest.importorskip("sentencepiece")
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match=r"tokenizer\.model"):
        load_tokenizer(tmp_path)
