"""The tokenizer a GGUF file describes (``tokenizer.ggml.*`` and ``tokenizer.chat_template``),
built with the ``tokenizers`` library and wrapped like ``model.tokenizer.load_tokenizer``'s.

``tokenizer.ggml.model``:

``gpt2``   byte-level BPE: ``tokens`` (byte-level spelling), ``merges`` ("left right", best
           first); the pre-tokenizer follows ``tokenizer.ggml.pre`` as llama.cpp's
           ``llama-vocab.cpp`` does (``smollm``: every digit split off, then GPT-2's regex).
``llama``  SentencePiece-style BPE with byte fallback (``<0xNN>`` tokens), merges from
           ``tokenizer.ggml.merges`` or, when absent, recovered from ``scores``;
           ``tokenizer.ggml.add_space_prefix`` (default true) prepends "▁" to the text's first
           piece only, spaces become "▁".

Token types (llama.cpp's ``LLAMA_TOKEN_TYPE_*``): 3 CONTROL -> special added token, 4
USER_DEFINED -> added token matched whole; BOS is prepended when ``tokenizer.ggml.add_bos_token``
says so (default: true for ``llama``, false for ``gpt2``, as in llama.cpp and transformers).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hal.errors import CheckpointError
from model.gguf_file import GGUFFile

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

CONTROL, USER_DEFINED = 3, 4
_GPT2_PRE = ("default", "gpt2", "smollm")
"""``tokenizer.ggml.pre`` values whose split is GPT-2's regex (``smollm`` with digits split first)."""


def _keys():
    import gguf

    return gguf.Keys.Tokenizer


def special_tokens(file: GGUFFile, tokens: list[str]) -> dict[str, str]:
    """``{"bos_token": "<|im_start|>", ...}`` from the ``tokenizer.ggml.*_token_id`` keys."""
    keys = _keys()
    out = {}
    for name, key in (("bos_token", keys.BOS_ID), ("eos_token", keys.EOS_ID), ("unk_token", keys.UNK_ID),
                      ("pad_token", keys.PAD_ID)):
        index = file.integer(key, None)
        if index is None:
            continue
        if not 0 <= index < len(tokens):
            raise CheckpointError(f"{file.path}: GGUF key '{key}' is {index}, outside the {len(tokens)} tokens")
        out[name] = tokens[index]
    return out


def _byte_level(file: GGUFFile, tokens: list[str]) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    keys = _keys()
    pre = file.string(keys.PRE, "default")
    if pre not in _GPT2_PRE:
        raise CheckpointError(f"{file.path}: unsupported GGUF tokenizer pre-tokenizer '{pre}' ({keys.PRE}); "
                              f"supported: {', '.join(_GPT2_PRE)}")
    merges = [tuple(m.split(" ", 1)) for m in file.strings(keys.MERGES)]
    if any(len(m) != 2 for m in merges):
        raise CheckpointError(f"{file.path}: GGUF key '{keys.MERGES}' holds an entry that is not 'left right'")
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if pre == "smollm" else byte_level)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _sentencepiece(file: GGUFFile, tokens: list[str], unk: str | None) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.tokenization_utils_base import generate_merges

    keys = _keys()
    vocab = {token: i for i, token in enumerate(tokens)}
    raw_merges = file.strings(keys.MERGES, None)
    if raw_merges is not None:
        merges = [tuple(m.split(" ", 1)) for m in raw_merges]
    else:
        scores = file.value(keys.SCORES)
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise CheckpointError(f"{file.path}: GGUF key '{keys.SCORES}' must hold one score per token")
        merges = generate_merges(vocab, dict(zip(tokens, scores)))
    has_bytes = all(f"<0x{b:02X}>" in vocab for b in range(256))
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=has_bytes))
    prefix = file.boolean(keys.ADD_PREFIX, True)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                     prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def build_backend(file: GGUFFile) -> tuple[Tokenizer, dict[str, Any]]:
    """The ``tokenizers.Tokenizer`` and the ``PreTrainedTokenizerFast`` settings (special tokens,
    chat template, add_bos/add_eos) of the file. Raises :class:`CheckpointError` naming the key."""
    from tokenizers import AddedToken, processors

    keys = _keys()
    kind = file.string(keys.MODEL)
    tokens = file.strings(keys.LIST)
    specials = special_tokens(file, tokens)
    if kind == "gpt2":
        backend = _byte_level(file, tokens)
    elif kind == "llama":
        backend = _sentencepiece(file, tokens, specials.get("unk_token"))
    else:
        raise CheckpointError(f"{file.path}: unsupported GGUF tokenizer model '{kind}' ({keys.MODEL}); "
                              "supported: gpt2, llama")
    types = file.value(keys.TOKEN_TYPE, [])
    if types and len(types) != len(tokens):
        raise CheckpointError(f"{file.path}: GGUF key '{keys.TOKEN_TYPE}' has {len(types)} entries for "
                              f"{len(tokens)} tokens")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind_ in zip(tokens, types) if kind_ == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind_ in zip(tokens, types) if kind_ == USER_DEFINED])
    add_bos = file.boolean(keys.ADD_BOS, kind == "llama")
    add_eos = file.boolean(keys.ADD_EOS, False)
    if add_bos or add_eos:
        bos, eos = specials.get("bos_token"), specials.get("eos_token")
        if (add_bos and bos is None) or (add_eos and eos is None):
            raise CheckpointError(f"{file.path}: '{keys.ADD_BOS if add_bos and bos is None else keys.ADD_EOS}' "
                                  "is set but the token id key is missing")
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + single.replace("$A:0", "$B:1").replace(":0", ":1")
        used = {t for t, on in ((bos, add_bos), (eos, add_eos)) if on}
        template = processors.TemplateProcessing(single=single, pair=pair,
                                                 special_tokens=[(t, tokens.index(t)) for t in used])
        backend.post_processor = (processors.Sequence([backend.post_processor, template])
                                  if backend.post_processor is not None else template)
    settings: dict[str, Any] = dict(specials)
    template_text = file.string(keys.CHAT_TEMPLATE, None)
    if template_text is not None:
        settings["chat_template"] = template_text
    settings["add_bos_token"] = add_bos
    settings["add_eos_token"] = add_eos
    return backend, settings


def load_gguf_tokenizer(file: GGUFFile) -> PreTrainedTokenizerBase:
    """A ``PreTrainedTokenizerFast`` equal to the GGUF's tokenizer; no remote code, no download."""
    from transformers import PreTrainedTokenizerFast

    backend, settings = build_backend(file)
    try:
        return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=str(file.path), **settings)
    except Exception as exc:
        raise CheckpointError(f"{file.path}: cannot build a tokenizer from the GGUF metadata: {exc}") from exc
