"""A small, deterministic MiniCPM-layout tokenizer for synthetic checkpoints.

:func:`write_tokenizer` writes the four Hugging Face tokenizer files a MiniCPM4 checkpoint ships
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json``)
for any vocabulary size from 512 up (73448 is the real one). The files follow the real
tokenizer's layout and pipeline: a SentencePiece-style BPE with byte fallback, the legacy Llama
normalizer (prepend ``▁``, spaces to ``▁``), ``<unk>``/``<s>``/``</s>`` at ids 0-2, the byte tokens
``<0x00>``..``<0xFF>`` at ids 3-258, and the eight MiniCPM control tokens at ids V-8..V-1, which (as
in the real ``tokenizer.json``) are added tokens outside the BPE model vocabulary.

The merges are learned by a tiny greedy BPE trainer (pure Python, ties broken by the pair's
strings, so every run gives the same bytes) on a built-in English text in which the seven demo
prompts are weighted up, so those prompts encode into a handful of word-level tokens. Vocabulary
slots the text cannot fill are padded with ``<|reserved_N|>`` tokens. Printable ASCII and newline
are single-character tokens; any other character (tab, Chinese, emoji, ...) encodes as UTF-8 byte
tokens and decodes back exactly.
"""
from __future__ import annotations

import functools
import heapq
import json
import os
import re
from collections import Counter

from model.tokenizer import CHATML_TEMPLATE, CHATML_THINKING_TEMPLATE

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
MINICPM_CONTROL_TOKENS: tuple[str, ...] = (
    "<|im_end|>", "<|im_start|>", "<|tool_call|>", "<|execute_start|>",
    "<|execute_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
)
"""The control tokens at ids V-8..V-1, in id order; ``<|im_end|>`` (V-8) is the eos token."""

SPACE = "\u2581"
N_BYTES = 256
MIN_VOCAB_SIZE = 512

# The seven completion prompts of seed 004 (the accuracy protocol); validation.prompts uses them as
# its defaults and the tokenizer is trained to split them into whole words.
DEMO_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Einstein is known for",
    "Quantum computing is",
    "The meaning of life is",
    "Machine learning is a",
    "Python is a programming",
    "Natural language processing",
)
_PROMPT_WEIGHT = 40

_CORPUS = """\
The capital of France is Paris, a city on the river Seine. Paris is known for its art, its food and
its long history. Many people visit the city every year to see the museums, the old streets and the
tower that was built for the world fair. The country has a rich culture, and French is spoken in
many other parts of the world.

Einstein is known for the theory of relativity, which changed the way we think about space, time
and energy. He was born in Germany and later worked in Switzerland and in the United States. His
famous equation shows that mass and energy are two forms of the same thing. He also explained the
photoelectric effect, which helped to start quantum physics.

Quantum computing is a new way of computing that uses the rules of quantum mechanics. A quantum
computer stores information in qubits, which can be in a mix of states at the same time. For some
problems, such as searching large spaces or simulating molecules, a quantum computer could be much
faster than a classical one. Building one that works well is still very hard.

The meaning of life is a question that people have asked for thousands of years. Some find meaning
in family and friends, some in work or art, and some in faith or in the search for knowledge. There
is no single answer, but many agree that kindness, curiosity and love make life good.

Machine learning is a field of computer science where programs learn from data instead of being
told every step. A model is trained on many examples, and then it can make predictions about new
inputs. Deep learning uses large neural networks with many layers, and it is the basis of modern
language models.

Python is a programming language that is easy to read and easy to learn. It is used for web
development, data science, machine learning and automation. Python has a large standard library and
a friendly community, and many students write their first program in Python.

Natural language processing is the part of artificial intelligence that helps computers understand
and generate human language. It is used in translation, search, chat assistants and text analysis.
A language model reads a sequence of tokens and predicts the next token, one step at a time.

Hello! How are you today? I am fine, thank you. What is your name? My name is Mini. This is a simple
test of the tokenizer, with numbers like 0 1 2 3 4 5 6 7 8 9 10 100 2024 and symbols such as
( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ ` ' " : ; , . ? ! and the words system, user,
assistant, tool, answer, question, think, reason, because, should, would, could, first, second,
then, finally, example, result, output, input, yes, no, true, false, good, great, small, big.
"""

_WORD_RE = re.compile(rf"{SPACE}?[A-Za-z]+|{SPACE}?[0-9]|{SPACE}?[^\sA-Za-z0-9{SPACE}]")


def write_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int, thinking: bool = False) -> None:
    """Write a MiniCPM-layout tokenizer with exactly ``vocab_size`` ids into ``out_dir``.

    ``thinking=True`` stores the MiniCPM4.1-style template (``CHATML_THINKING_TEMPLATE``) instead of
    plain ChatML. The output is byte-identical for equal arguments. Raises ``ValueError`` when
    ``vocab_size`` is below 512.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an int >= {MIN_VOCAB_SIZE}, got {vocab_size!r}")
    vocab, merges = _model_vocab(vocab_size)
    first_control = vocab_size - len(MINICPM_CONTROL_TOKENS)
    control = {tok: first_control + i for i, tok in enumerate(MINICPM_CONTROL_TOKENS)}
    chat_template = CHATML_THINKING_TEMPLATE if thinking else CHATML_TEMPLATE

    os.makedirs(out_dir, exist_ok=True)
    files = {
        "tokenizer.json": _tokenizer_json(vocab, merges, control),
        "tokenizer_config.json": _tokenizer_config(control, chat_template),
        "special_tokens_map.json": _special_tokens_map(),
        "added_tokens.json": dict(control),
    }
    for name, obj in files.items():
        text = json.dumps(obj, ensure_ascii=False, indent=2) + "\n"
        with open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)


def _model_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE model vocabulary (ids 0..V-9) and the merges that fit into it."""
    alphabet, all_merges = _train()
    vocab: dict[str, int] = {UNK: 0, BOS: 1, EOS: 2}
    for b in range(N_BYTES):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    model_size = vocab_size - len(MINICPM_CONTROL_TOKENS)
    for ch in alphabet:
        if len(vocab) < model_size:
            vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    for left, right in all_merges:
        if left not in vocab or right not in vocab:
            continue
        merged = left + right
        if merged not in vocab:
            if len(vocab) >= model_size:
                break
            vocab[merged] = len(vocab)
        merges.append((left, right))
    for n in range(model_size - len(vocab)):
        vocab[f"<|reserved_{n}|>"] = len(vocab)
    return vocab, merges


@functools.lru_cache(maxsize=1)
def _train() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Learn the alphabet and the full, ordered merge list from the built-in text.

    Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair of strings)
    until every training word is one token. A prefix of the result is what a smaller budget would
    have learned, so one run serves every vocabulary size.
    """
    counts: Counter[str] = Counter()
    for text, weight in [(_CORPUS, 1)] + [(p, _PROMPT_WEIGHT) for p in DEMO_PROMPTS]:
        normalized = SPACE + " ".join(text.split()).replace(" ", SPACE)
        for word in _WORD_RE.findall(normalized):
            counts[word] += weight
    printable = {chr(c) for c in range(0x21, 0x7F)} | {SPACE, "\n"}
    alphabet = sorted({ch for word in counts for ch in word} | printable)

    words = [list(w) for w in sorted(counts)]
    freqs = [counts[w] for w in sorted(counts)]
    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freqs[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or neg == 0:
            continue
        merges.append(pair)
        merged = pair[0] + pair[1]
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            old = words[i]
            for p in zip(old, old[1:]):
                pair_counts[p] -= freqs[i]
                touched.add(p)
            new: list[str] = []
            j = 0
            while j < len(old):
                if j + 1 < len(old) and (old[j], old[j + 1]) == pair:
                    new.append(merged)
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            words[i] = new
            for p in zip(new, new[1:]):
                pair_counts[p] += freqs[i]
                where.setdefault(p, set()).add(i)
                touched.add(p)
        pair_counts.pop(pair, None)
        for p in sorted(touched - {pair}):
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                pair_counts.pop(p)
                where.pop(p, None)
    return tuple(alphabet), tuple(merges)


def _added_token(token_id: int, content: str) -> dict[str, object]:
    return {
        "id": token_id, "content": content, "single_word": False, "lstrip": False,
        "rstrip": False, "normalized": False, "special": True,
    }


def _tokenizer_json(
    vocab: dict[str, int], merges: list[tuple[str, str]], control: dict[str, int]
) -> dict[str, object]:
    """The ``tokenizers`` serialization, with the pipeline of the real (legacy Llama) one."""
    specials = [(0, UNK), (1, BOS), (2, EOS)] + [(i, t) for t, i in control.items()]
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, t) for i, t in specials],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": SPACE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                bos, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {BOS: {"id": BOS, "ids": [1], "tokens": [BOS]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": UNK,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(m) for m in merges],
        },
    }


def _tokenizer_config(control: dict[str, int], chat_template: str) -> dict[str, object]:
    specials = [(0, UNK), (1, BOS), (2, EOS)] + [(i, t) for t, i in control.items()]
    decoder = {}
    for token_id, content in specials:
        entry = _added_token(token_id, content)
        del entry["id"]
        decoder[str(token_id)] = entry
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(MINICPM_CONTROL_TOKENS[1:]),
        "bos_token": BOS,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": MINICPM_CONTROL_TOKENS[0],
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": UNK,
        "use_default_system_prompt": False,
    }


def _special_tokens_map() -> dict[str, object]:
    def token(content: str) -> dict[str, object]:
        return {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
        }

    return {
        "additional_special_tokens": list(MINICPM_CONTROL_TOKENS[1:]),
        "bos_token": token(BOS),
        "eos_token": token(MINICPM_CONTROL_TOKENS[0]),
        "unk_token": token(UNK),
    }
