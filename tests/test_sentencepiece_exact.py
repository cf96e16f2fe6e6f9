"""Tokenization from a bare tokenizer.model equals the ``sentencepiece`` library itself.

Every model here is trained inside the test with ``SentencePieceTrainer`` on an in-memory corpus,
one per normalizer/model setting that changes encoding or decoding; the reference is
``SentencePieceProcessor.encode`` / ``.decode`` on the same file.
"""
from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import sentencepiece as spm

from hal.errors import CheckpointError
from model.sentencepiece_pipeline import model_proto_module, pipeline_from_proto, read_model_proto
from model.tokenizer import CHATML_TEMPLATE, load_tokenizer, render_chat

CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there! The capital of France is Paris.",
    "In 2024 we sold 1234 apples and 56 pears for 78.90 euros.",
    "    indented code line with four spaces",
    "def f(x):  return x ** 2   # comment",
    "        return value  # eight spaces",
    "你好，世界！今天天气很好。我们去公园吧。",
    "日本語のテキストです。東京は大きい。",
    "Mixed 中文 and English text 123.",
    "Ελληνικά και русский текст.",
    "a  b   c    d     e",
    "Ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ and ① ② ③",
    "tab\tseparated\tvalues",
    "café naïve résumé",
)
"""Training text. Hebrew, Armenian, Georgian, most emoji and math letters are absent on purpose,
so encoding them needs byte fallback."""

TEXTS = (
    "",
    " ", "   ", "\t", "\n", "\n\n",
    "Hello", " Hello", "   Hello", "Hello ", "Hello   ", "  Hello  world  ",
    "The capital of France is",
    "a  b   c    d     e      f",
    "\tTab\tinside\t", "tab\t \tmix \t ",
    "line one\nline two\n", "\n\nleading newlines", "a\n  b\n\n  c", "\r\nwindows\r\n",
    "12345 678.90 and 2024-12-01", "x  1 2  3  456789",
    "    def f(x):\n        return x ** 2  # comment",
    "你好，世界！今天天气很好。", "日本語のテキストです",
    "混合 text with 日本語 and Ελληνικά и русский 123",
    "emoji 😀👍🏽 🇫🇷 👨\u200d👩\u200d👧 ❤️",
    "unseen: שלום բարեւ ქართული ᚠᚢ ∀x ☃ ꙮ 𝔘𝔫𝔦",
    "Ｆｕｌｌｗｉｄｔｈ ①②③ ﬁ ㎏",
    "café naïve e\u0301 NFC",
    "zero\u200bwidth\u200b", "\u200b", "\u3000ideographic\u3000space\u3000",
    "\x01\x02 control\x7f", "nbsp\u00a0here", "mid\u2581dle",
    " " * 17 + "x", "x" + " " * 9 + "y" + " " * 3,
    "----====----____", "a" * 40, "<0x41> literal",
    "   trailing\t \n ",
)
"""Leading, trailing and repeated spaces, tabs, newlines, digits, CJK, emoji, characters only byte
fallback can encode, characters the NFKC maps change or delete, mixed scripts, the empty string."""

COMMON = {
    "vocab_size": 500, "character_coverage": 1.0, "byte_fallback": True, "split_digits": True,
    "allow_whitespace_only_pieces": True, "hard_vocab_limit": False, "num_threads": 1,
    "minloglevel": 2, "seed_sentencepiece_size": 5000,
}
MINICPM4 = {
    "model_type": "bpe", "normalization_rule_name": "identity",
    "add_dummy_prefix": False, "remove_extra_whitespaces": False,
}
"""MiniCPM4's tokenizer.model settings (with COMMON's byte fallback, split digits and
whitespace-only pieces)."""


def _settings() -> Iterator[tuple[str, dict[str, object]]]:
    for model_type in ("bpe", "unigram"):
        for rule in ("identity", "nmt_nfkc"):
            for dummy in (True, False):
                for extra in (True, False):
                    prefix, spaces = ("prefix" if dummy else "noprefix"), ("strip" if extra else "keepws")
                    name = f"{model_type}-{rule}-{prefix}-{spaces}"
                    yield name, {"model_type": model_type, "normalization_rule_name": rule,
                                 "add_dummy_prefix": dummy, "remove_extra_whitespaces": extra}
    yield "bpe-nfkc_cf-prefix-strip", {"model_type": "bpe", "normalization_rule_name": "nfkc_cf"}
    yield "unigram-nmt_nfkc_cf-prefix-strip", {
        "model_type": "unigram", "normalization_rule_name": "nmt_nfkc_cf",
    }
    yield "bpe-identity-prefix-keepws-plain", {  # Llama-2 like, without the training-only options
        "model_type": "bpe", "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
        "split_digits": False, "allow_whitespace_only_pieces": False,
    }


SETTINGS = dict(_settings())
assert {k: SETTINGS["bpe-identity-noprefix-keepws"][k] for k in MINICPM4} == MINICPM4


def _train(folder: Path, **options: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 8), model_prefix=str(folder / "tokenizer"), **{**COMMON, **options}
    )
    (folder / "tokenizer.vocab").unlink()
    return folder / "tokenizer.model"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spm")
    return {name: _train(root / name, **options) for name, options in SETTINGS.items()}


def _is_unigram(name: str) -> bool:
    return name.startswith("unigram")


def _texts(name: str) -> tuple[str, ...]:
    """TEXTS less the documented limits of ``model.sentencepiece_pipeline`` that apply to ``name``."""
    skip = set()
    if _is_unigram(name):
        # tokenizers' Unigram lattice holds every piece, so literal byte-piece text such as
        # "<0x41>" can match the byte piece, which SentencePiece keeps out of its lattice.
        skip.add("<0x41> literal")
    return tuple(t for t in TEXTS if t not in skip)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_pipeline_equals_sentencepiece(models: dict[str, Path], name: str) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(models[name]))
    backend = pipeline_from_proto(read_model_proto(str(models[name])), name)
    spec = read_model_proto(str(models[name])).normalizer_spec
    options = {**COMMON, **SETTINGS[name]}
    assert spec.add_dummy_prefix == options.get("add_dummy_prefix", True)
    assert spec.remove_extra_whitespaces == options.get("remove_extra_whitespaces", True)
    assert bool(spec.precompiled_charsmap) == (options["normalization_rule_name"] != "identity")
    for text in _texts(name):
        expected = sp.encode(text)
        got = backend.encode(text, add_special_tokens=False).ids
        assert got == expected, (text, sp.encode(text, out_type=str), got)
        assert backend.decode(got, skip_special_tokens=False) == sp.decode(expected), text


@pytest.mark.parametrize("name", list(SETTINGS))
def test_decoding_any_pieces_equals_sentencepiece(models: dict[str, Path], name: str) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(models[name]))
    backend = pipeline_from_proto(read_model_proto(str(models[name])), name)
    normal = [i for i in range(sp.GetPieceSize()) if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i))]
    bare_space = sp.PieceToId("\u2581")
    rng = random.Random(name)
    for _ in range(200):
        # With remove_extra_whitespaces SentencePiece drops one "▁" from EACH leading piece while
        # the text is still empty; a fused-text decoder drops one, so no sequence starts with "▁".
        ids = [rng.choice(normal) for _ in range(rng.randint(1, 12))]
        ids = [i for i in ids if i != bare_space] + [bare_space] * ids.count(bare_space)
        assert backend.decode(ids, skip_special_tokens=False) == sp.decode(ids), ids


@pytest.mark.parametrize("rule", ["nmt_nfkc", "nfkc_cf"])
def test_character_map_equals_sentencepiece_on_every_bmp_code_point(tmp_path: Path, rule: str) -> None:
    """The precompiled map maps each of the 63,488 BMP code points (surrogates aside) as
    SentencePiece's normalizer does, one code point at a time."""
    model = _train(tmp_path, model_type="bpe", normalization_rule_name=rule,
                   add_dummy_prefix=False, remove_extra_whitespaces=False)
    normalizer = spm.SentencePieceNormalizer(model_file=str(model))
    backend = pipeline_from_proto(read_model_proto(str(model)), rule)
    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000]
    mismatches = [c for c in chars if backend.normalizer.normalize_str(c) != normalizer.normalize(c)]
    assert not mismatches, [ascii(c) for c in mismatches[:10]]
    assert sum(normalizer.normalize(c) != c for c in chars) > 1000  # the map does change text


def _checkpoint_folder(folder: Path, bos_added: bool = True) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": bos_added, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "legacy": True, "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
    }), encoding="utf-8")


@pytest.mark.parametrize("name", list(SETTINGS))
def test_checkpoint_loading_equals_sentencepiece(models: dict[str, Path], name: str) -> None:
    folder = models[name].parent
    _checkpoint_folder(folder)
    tok = load_tokenizer(folder)
    sp = spm.SentencePieceProcessor(model_file=str(models[name]))
    assert len(tok) == sp.GetPieceSize()
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    for text in _texts(name):
        expected = sp.encode(text)
        ids = tok.encode(text)
        assert ids[0] == sp.bos_id() and ids.count(sp.bos_id()) == 1, text
        assert ids[1:] == expected, (text, sp.encode(text, out_type=str))
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode([sp.bos_id()] + expected), text
        assert tok.decode(ids[1:]) == sp.decode(expected), text


def test_model_tokenizer_from_tokenizer_model_only(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """End to end through the model: a checkpoint folder whose only tokenizer file is a MiniCPM4-
    style tokenizer.model; ``model.tokenizer`` encodes a chat prompt as SentencePiece does and
    decodes generated ids as SentencePiece does."""
    import hal

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    for name in ("tokenizer.json", "added_tokens.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    _train(tmp_path / "spm", **SETTINGS["bpe-identity-noprefix-keepws"],
           user_defined_symbols=["<|im_start|>", "<|im_end|>"])
    shutil.copy(tmp_path / "spm" / "tokenizer.model", folder / "tokenizer.model")
    _checkpoint_folder(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    model = hal.load_model(folder, "cpu", "float32")
    tok = model.tokenizer
    prompt = render_chat(tok, [{"role": "user", "content": "The capital of France is  Paris 2024 😀"}])
    ids = tok.encode(prompt)
    assert ids == [sp.bos_id()] + sp.encode(prompt)
    new = model.generate([ids], max_new_tokens=6, do_sample=False)[0]
    assert len(new) >= 1 and all(0 <= i < model.config.vocab_size for i in new)
    # Random weights: keep the ids SentencePiece knows, and no lone byte pieces (whose invalid
    # UTF-8 runs decode differently, a documented limit).
    readable = [i for i in new if i < sp.GetPieceSize() and not sp.IsByte(i)]
    assert tok.decode(readable, skip_special_tokens=True) == sp.decode(readable)
    assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids) == prompt


def test_minicpm4_settings_keep_the_first_word_and_spaces(models: dict[str, Path]) -> None:
    """The issue's case: no dummy prefix, so "The" is not "▁The", and space runs are kept."""
    folder = models["bpe-identity-noprefix-keepws"].parent
    _checkpoint_folder(folder)
    tok = load_tokenizer(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    pieces = tok.convert_ids_to_tokens(tok.encode("The capital", add_special_tokens=False))
    assert pieces == sp.encode("The capital", out_type=str) and pieces[0].startswith("T")
    spaced = tok.convert_ids_to_tokens(tok.encode("a   b", add_special_tokens=False))
    assert "".join(spaced) == "a\u2581\u2581\u2581b"
    lead = tok.encode(" lead", add_special_tokens=False)
    assert tok.decode(lead) == " lead" == sp.decode(sp.encode(" lead"))


@pytest.mark.parametrize("name", ["bpe-identity-noprefix-keepws", "bpe-identity-prefix-keepws",
                                  "unigram-nmt_nfkc-prefix-strip"])
def test_added_and_user_defined_tokens(tmp_path: Path, name: str) -> None:
    """User-defined pieces (SentencePiece matches them in text), control pieces and
    added_tokens.json tokens are matched in the raw text; the text between them is encoded as
    SentencePiece encodes it alone. Without a dummy prefix or whitespace removal (MiniCPM4) that is
    exactly SentencePiece's encoding of the whole text."""
    user = ["<|im_start|>", "<|im_end|>"]
    model = _train(tmp_path, **SETTINGS[name], user_defined_symbols=user, control_symbols=["<|fim|>"])
    sp = spm.SentencePieceProcessor(model_file=str(model))
    _checkpoint_folder(tmp_path)
    extra = {"<|tool|>": sp.GetPieceSize(), "<|end|>": sp.GetPieceSize() + 1}
    (tmp_path / "added_tokens.json").write_text(json.dumps(extra), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert len(tok) == sp.GetPieceSize() + 2
    pieces = user + ["<|fim|>"]
    assert [tok.convert_tokens_to_ids(t) for t in pieces] == [sp.PieceToId(t) for t in pieces]
    assert sp.IsControl(sp.PieceToId("<|fim|>")) and not sp.IsControl(sp.PieceToId(user[0]))

    chat = render_chat(tok, [{"role": "user", "content": "Hello  world 123"}])
    parts = ["user\nHello  world 123", "\n", "assistant\n"]
    expected = [sp.PieceToId(user[0])] + sp.encode(parts[0]) + [sp.PieceToId(user[1])] + sp.encode(parts[1])
    expected += [sp.PieceToId(user[0])] + sp.encode(parts[2])
    ids = tok.encode(chat, add_special_tokens=False)
    assert ids == expected
    assert tok.decode(ids) == sp.decode(expected)
    if name == "bpe-identity-noprefix-keepws":
        assert ids == sp.encode(chat)
    for token, token_id in [("<|fim|>", sp.PieceToId("<|fim|>"))] + list(extra.items()):
        text = f"a {token} b"
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode("a ") + [token_id] + sp.encode(" b"), (token, ids)
        assert tok.decode([token_id], skip_special_tokens=True) == ""
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode("a ") + sp.encode(" b"))


def test_without_byte_fallback_unknown_ids_match(tmp_path: Path) -> None:
    """Without byte fallback unknown characters become the unk id, as in SentencePiece. Decoding
    them differs by design: the unk id is a special token (skipped or "<unk>", not " ⁇ ")."""
    for model_type in ("bpe", "unigram"):
        model = _train(tmp_path / model_type, model_type=model_type, byte_fallback=False, vocab_size=200)
        sp = spm.SentencePieceProcessor(model_file=str(model))
        backend = pipeline_from_proto(read_model_proto(str(model)), model_type)
        unknown = 0
        for text in _texts(model_type):
            expected = sp.encode(text)
            assert backend.encode(text).ids == expected, (model_type, text)
            unknown += expected.count(sp.unk_id())
        assert unknown > 10


def _rewrite(model: Path, out: Path, change) -> Path:
    proto = read_model_proto(str(model))
    change(proto)
    out.write_bytes(proto.SerializeToString())
    return out


def test_unsupported_models_are_refused_in_one_line(tmp_path: Path) -> None:
    model_pb2 = model_proto_module()
    base = _train(tmp_path / "base", **SETTINGS["bpe-identity-prefix-strip"])
    nfkc_map = read_model_proto(str(_train(tmp_path / "nfkc", normalization_rule_name="nfkc")))
    nfkc_map = nfkc_map.normalizer_spec.precompiled_charsmap
    unused = model_pb2.ModelProto.SentencePiece.UNUSED
    cases = {
        "model_type": _train(tmp_path / "word", model_type="word", byte_fallback=False, vocab_size=100),
        "treat_whitespace_as_suffix": _train(tmp_path / "suffix", treat_whitespace_as_suffix=True),
        "UNUSED": _rewrite(base, tmp_path / "unused.model", lambda p: setattr(p.pieces[300], "type", unused)),
        "denormalizer_spec": _rewrite(
            base, tmp_path / "denorm.model",
            lambda p: setattr(p.denormalizer_spec, "precompiled_charsmap", nfkc_map),
        ),
        "escape_whitespaces": _rewrite(base, tmp_path / "escape.model",
                                       lambda p: setattr(p.normalizer_spec, "escape_whitespaces", False)),
    }
    for field, model in cases.items():
        spm.SentencePieceProcessor(model_file=str(model))  # SentencePiece itself loads each one
        folder = tmp_path / f"ckpt-{field}"
        folder.mkdir()
        (folder / "tokenizer.model").write_bytes(model.read_bytes())
        with pytest.raises(CheckpointError, match=field) as info:
            load_tokenizer(folder)
        message = str(info.value)
        assert "tokenizer.model" in message and str(folder) in message and "\n" not in message, message


def test_missing_protobuf_names_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _train(tmp_path, **SETTINGS["bpe-identity-noprefix-keepws"])

    def no_protobuf():
        raise ImportError("reading a SentencePiece model needs the sentencepiece and protobuf packages: "
                          "pip install sentencepiece protobuf")

    monkeypatch.setattr("model.sentencepiece_pipeline.model_proto_module", no_protobuf)
    with pytest.raises(CheckpointError, match="pip install sentencepiece protobuf") as info:
        load_tokenizer(tmp_path)
    assert "tokenizer.model" in str(info.value) and "\n" not in str(info.value)
