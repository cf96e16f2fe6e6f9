"""Tokenizer loading and chat rendering for MiniCPM checkpoints, without remote code.

``AutoTokenizer.from_pretrained(folder)`` is avoided: it consults ``config.json`` (``model_type``
"minicpm" and an ``auto_map`` into remote code), and in transformers 5.x the ``LlamaTokenizer`` it
picks rebuilds its pipeline from the vocabulary (a ``Metaspace`` pre-tokenizer) instead of using
the normalizer of ``tokenizer.json``, which changes the ids of text that starts with a space. This
module builds the tokenizer straight from the tokenizer files (``tokenizer.json``, else a
SentencePiece ``tokenizer.model``) and applies ``tokenizer_config.json`` itself.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hal.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The exact chat template of MiniCPM4-0.5B / -8B: plain ChatML, no system prompt, no BOS."""

# UNVERIFIED: the real MiniCPM4.1 Jinja text was not found. This follows Qwen3: thinking is the
# default and only ``enable_thinking=False`` pre-fills an empty think block in the assistant turn.
CHATML_THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}"
    "{% endif %}"
    "{% endif %}"
)
"""MiniCPM4.1-style hybrid-reasoning ChatML (``enable_thinking``); the exact 4.1 text is unverified."""

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_PASSED_KEYS = (
    "add_bos_token", "add_eos_token", "clean_up_tokenization_spaces", "legacy", "model_max_length",
    "padding_side", "truncation_side", "spaces_between_special_tokens", "chat_template",
)


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a Hugging Face-layout checkpoint folder.

    Uses ``tokenizer.json`` through ``PreTrainedTokenizerFast``; without it, converts a SentencePiece
    ``tokenizer.model`` (BPE or Unigram; needs the ``sentencepiece`` and ``protobuf`` packages) into
    a pipeline that encodes and decodes text as ``SentencePieceProcessor`` does, following the
    model's normalizer spec. Never runs remote code.
    Honours ``tokenizer_config.json`` (special tokens, ``add_bos_token``/``add_eos_token``,
    ``chat_template``, ``clean_up_tokenization_spaces``), then ``special_tokens_map.json`` and a
    ``chat_template.jinja`` file. Raises ``CheckpointError`` naming the file when no tokenizer
    file exists or one is unreadable or malformed.
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise CheckpointError(f"tokenizer folder not found (not a directory): {folder}")
    json_file = os.path.join(folder, "tokenizer.json")
    spm_file = os.path.join(folder, "tokenizer.model")
    if not os.path.isfile(json_file) and not os.path.isfile(spm_file):
        raise CheckpointError(f"no tokenizer file in {folder}: expected tokenizer.json or tokenizer.model")

    settings = _read_settings(folder)
    from transformers import PreTrainedTokenizerFast

    if os.path.isfile(json_file):
        _read_json(json_file)
        try:
            return PreTrainedTokenizerFast(tokenizer_file=json_file, name_or_path=folder, **settings)
        except Exception as exc:
            raise CheckpointError(f"cannot load tokenizer.json ({json_file}): {exc}") from exc
    backend, defaults = _tokenizer_from_sentencepiece(spm_file, settings)
    settings = {**defaults, **settings}
    try:
        return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=folder, **settings)
    except Exception as exc:
        raise CheckpointError(f"cannot build a tokenizer from tokenizer.model ({spm_file}): {exc}") from exc


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    enable_thinking: bool | None = None,
) -> str:
    """Render ``messages`` (dicts with ``role`` and ``content``) to the prompt text.

    Uses the tokenizer's chat template, else ``CHATML_TEMPLATE``. ``enable_thinking`` is passed to
    the template only when not ``None``. The text carries no BOS: encoding it with
    ``add_special_tokens=True`` adds one. Raises ``InputError`` for malformed messages.
    """
    _check_messages(messages)
    template = getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
    extra = {} if enable_thinking is None else {"enable_thinking": bool(enable_thinking)}
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )
    except Exception as exc:
        raise InputError(f"chat template failed: {exc}") from exc
    if not isinstance(text, str):
        raise InputError(f"chat template returned {type(text).__name__}, not text")
    return text


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        kind = type(messages).__name__
        raise InputError(f"messages must be a list of {{'role', 'content'}} dicts, got {kind}")
    if not messages:
        raise InputError("messages is empty: give at least one {'role', 'content'} dict")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            kind = type(message).__name__
            raise InputError(f"messages[{i}] must be a dict with 'role' and 'content', got {kind}")
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise InputError(f"messages[{i}] has role {role!r}; expected one of {sorted(CHAT_ROLES)}")
        if "content" not in message:
            raise InputError(f"messages[{i}] ({role}) has no 'content'")
        if not isinstance(message["content"], str):
            kind = type(message["content"]).__name__
            raise InputError(f"messages[{i}] ({role}) content must be a string, got {kind}")


def _read_json(file: str) -> Any:
    name = os.path.basename(file)
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{name} is not valid JSON ({file}): {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {name} ({file}): {exc}") from exc


def _token_text(value: Any, key: str, file: str) -> str | None:
    """A special token as written in the config: a string, null, or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    name = os.path.basename(file)
    raise CheckpointError(f"{name}: {key} must be a string or a token object, got {value!r} ({file})")


def _read_settings(folder: str) -> dict[str, Any]:
    """The keyword arguments for ``PreTrainedTokenizerFast`` from the folder's config files."""
    config_file = os.path.join(folder, "tokenizer_config.json")
    config: Any = _read_json(config_file) if os.path.isfile(config_file) else {}
    if not isinstance(config, dict):
        raise CheckpointError(f"tokenizer_config.json must hold a JSON object ({config_file})")

    settings: dict[str, Any] = {k: config[k] for k in _PASSED_KEYS if k in config}
    for key in _SPECIAL_KEYS:
        if key in config:
            settings[key] = _token_text(config[key], key, config_file)
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    if isinstance(extra, list):
        settings["extra_special_tokens"] = [_token_text(t, "additional_special_tokens", config_file)
                                            for t in extra]

    map_file = os.path.join(folder, "special_tokens_map.json")
    if os.path.isfile(map_file):
        special_map = _read_json(map_file)
        if not isinstance(special_map, dict):
            raise CheckpointError(f"special_tokens_map.json must hold a JSON object ({map_file})")
        for key in _SPECIAL_KEYS:
            if key not in settings and key in special_map:
                settings[key] = _token_text(special_map[key], key, map_file)

    template_file = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(template_file):
        try:
            with open(template_file, encoding="utf-8") as f:
                settings["chat_template"] = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read chat_template.jinja ({template_file}): {exc}") from exc
    template = settings.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        settings["chat_template"] = named.get("default") or next(iter(named.values()), None)
    if settings.get("chat_template") is not None and not isinstance(settings["chat_template"], str):
        raise CheckpointError(f"tokenizer_config.json: chat_template must be a string ({config_file})")
    return settings


def _tokenizer_from_sentencepiece(
    spm_file: str, settings: Mapping[str, Any]
) -> tuple[Tokenizer, dict[str, Any]]:
    """A ``tokenizers`` pipeline that encodes and decodes like ``SentencePieceProcessor`` on
    ``spm_file`` (``model.sentencepiece_pipeline``), with the checkpoint's special tokens added,
    and the model's own unk/bos/eos tokens as defaults for the settings.

    Special tokens (CONTROL and UNKNOWN pieces, the config's bos/eos/unk/pad, ``added_tokens.json``)
    and USER_DEFINED pieces are matched in the raw text; the text between two of them is encoded as
    SentencePiece encodes that text alone (so with a dummy prefix each piece of text gets one, as
    transformers' ``legacy`` Llama tokenizer does). Needs the ``sentencepiece`` and ``protobuf``
    packages; transformers' own conversion is avoided because it silently tries a TikToken reading
    when it fails.
    """
    folder = os.path.dirname(spm_file)
    try:
        import sentencepiece as spm
    except ImportError as exc:
        message = f"only tokenizer.model in {folder}, and the sentencepiece package is missing"
        raise CheckpointError(message) from exc
    from tokenizers import AddedToken, processors

    from model.sentencepiece_pipeline import pipeline_from_proto, read_model_proto, user_defined_pieces

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(spm_file)
    except Exception as exc:
        raise CheckpointError(f"tokenizer.model is not a SentencePiece model ({spm_file}): {exc}") from exc
    proto = read_model_proto(spm_file)
    backend = pipeline_from_proto(proto, f"tokenizer.model ({spm_file})")
    size = sp.GetPieceSize()
    own_ids = {"unk_token": sp.unk_id(), "bos_token": sp.bos_id(), "eos_token": sp.eos_id()}
    defaults: dict[str, Any] = {key: sp.IdToPiece(i) for key, i in own_ids.items() if 0 <= i < size}
    # SentencePiece's decode never tidies spaces around punctuation.
    defaults["clean_up_tokenization_spaces"] = False
    added = _added_tokens_of(folder)
    specials = [sp.IdToPiece(i) for i in range(size) if sp.IsControl(i) or sp.IsUnknown(i)]
    specials += [str(settings.get(k) or defaults.get(k) or "") for k in _SPECIAL_KEYS]
    specials += [token for token, _ in added]
    specials = [t for t in dict.fromkeys(specials) if t]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    plain = [t for t in user_defined_pieces(proto) if t not in set(specials)]
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    for token, token_id in added:
        if backend.token_to_id(token) != token_id:
            raise CheckpointError(
                f"added_tokens.json gives {token!r} id {token_id}, but tokenizer.model places it at "
                f"{backend.token_to_id(token)} ({spm_file})"
            )
    bos = settings.get("bos_token") or defaults.get("bos_token")
    if bos is not None and backend.token_to_id(bos) is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
            special_tokens=[(bos, backend.token_to_id(bos))],
        )
    return backend, defaults


def _added_tokens_of(folder: str) -> list[tuple[str, int]]:
    """The (token, id) pairs of ``added_tokens.json``, in id order."""
    file = os.path.join(folder, "added_tokens.json")
    if not os.path.isfile(file):
        return []
    added = _read_json(file)
    if not isinstance(added, dict) or not all(isinstance(i, int) for i in added.values()):
        raise CheckpointError(f"added_tokens.json must map tokens to integer ids ({file})")
    return sorted(added.items(), key=lambda kv: kv[1])
