"""What llama.cpp's ``convert_hf_to_gguf.py`` writes for a MiniCPM checkpoint (class
``MiniCPMModel``: ``TextModel.set_gguf_parameters`` + the μP scales, ``_set_vocab_sentencepiece``,
``LlamaModel.permute`` on q_proj / k_proj, ``generate_extra_tensors`` for the LongRoPE factors),
re-implemented for the tests with ``gguf.GGUFWriter`` from one of our synthetic checkpoints.

It is written from the converter's code, not from ``model/gguf_checkpoint.py``: the permutation
and the key names here are the converter's, so a loader that undoes them wrongly fails.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import torch
from safetensors import safe_open

# llama.cpp's SentencePiece token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


MIXED_LINEAR_TYPES = {"attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q4_0", "attn_output": "Q8_0",
                      "ffn_gate": "Q4_1", "ffn_up": "Q4_1", "ffn_down": "Q4_0"}
"""Decoder linears in every GGUF type kept quantized: fused qkv Q4_0, o Q8_0, gate_up Q4_1, down Q4_0."""


def tensor_types(mapping: dict[str, str]) -> Callable[[str], gguf.GGMLQuantizationType]:
    """A ``tensor_type`` for :func:`write_minicpm_gguf`: tensors whose GGUF name holds ``.<part>.`` in
    the type ``mapping[part]`` names, the rest F32."""
    def tensor_type(name: str) -> gguf.GGMLQuantizationType:
        kind = next((k for part, k in mapping.items() if f".{part}." in name), "F32")
        return gguf.GGMLQuantizationType[kind]
    return tensor_type


def converter_permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """``LlamaModel.permute`` of convert_hf_to_gguf.py, as written there."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _vocab(folder: Path) -> tuple[list[str], list[float], list[int], dict[str, Any]]:
    """tokens / scores / token types in id order from our tokenizer files (the converter reads
    tokenizer.model; ours has the same pieces in tokenizer.json, and BPE merge order = id order)."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    pieces = dict(data["model"]["vocab"])
    for added in data.get("added_tokens", []):
        pieces[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(pieces.items(), key=lambda kv: kv[1])]
    assert [pieces[t] for t in tokens] == list(range(len(tokens)))
    special = {a["content"] for a in data.get("added_tokens", []) if a.get("special")}
    types, scores = [], []
    for i, token in enumerate(tokens):
        if token == "<unk>":
            types.append(UNKNOWN)
        elif token in special or token in ("<s>", "</s>"):
            types.append(CONTROL)
        elif token.startswith("<0x") and len(token) == 6:
            types.append(BYTE)
        else:
            types.append(NORMAL)
        scores.append(-float(i) if types[-1] == NORMAL else 0.0)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    return tokens, scores, types, config


def write_minicpm_gguf(folder: Path, out: Path, *, write_original_context: bool = False,
                       tensor_type: Callable[[str], gguf.GGMLQuantizationType] | None = None,
                       edit: Callable[[gguf.GGUFWriter], None] | None = None,
                       skip_keys: tuple[str, ...] = ()) -> Path:
    """Write ``out`` (architecture ``minicpm``) from the synthetic checkpoint ``folder``.

    write_original_context: also write ``minicpm.rope.scaling.original_context_length`` (the
    converter does not; without it llama.cpp takes context_length as the original length).
    tensor_type: GGUF name -> storage type (default F32). edit: called before writing, to add
    keys. skip_keys: metadata keys left out (error tests)."""
    hp = json.loads((folder / "config.json").read_text())
    writer = gguf.GGUFWriter(str(out), "minicpm")
    skipped = set(skip_keys)
    original_add = writer.add_key_value

    def add_key_value(key, val, vtype, sub_type=None):
        if key not in skipped:
            original_add(key, val, vtype, sub_type)

    writer.add_key_value = add_key_value  # type: ignore[method-assign]
    layers = hp["num_hidden_layers"]
    writer.add_block_count(layers)
    writer.add_context_length(hp["max_position_embeddings"])
    writer.add_embedding_length(hp["hidden_size"])
    writer.add_feed_forward_length(hp["intermediate_size"])
    writer.add_head_count(hp["num_attention_heads"])
    writer.add_head_count_kv(hp["num_key_value_heads"])
    rope = hp.get("rope_scaling") or {}
    if rope.get("rope_type") == "longrope":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        if write_original_context:
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_embedding_scale(float(hp["scale_emb"]))
    writer.add_residual_scale(hp["scale_depth"] / hp["num_hidden_layers"] ** 0.5)
    writer.add_logit_scale(hp["hidden_size"] / hp["dim_model_base"])

    tokens, scores, types, tok_config = _vocab(folder)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(True)
    writer.add_bos_token_id(tokens.index(tok_config["bos_token"]))
    writer.add_eos_token_id(tokens.index(tok_config["eos_token"]))
    writer.add_unk_token_id(tokens.index(tok_config["unk_token"]))
    writer.add_add_bos_token(bool(tok_config.get("add_bos_token", True)))
    writer.add_add_eos_token(bool(tok_config.get("add_eos_token", False)))
    if tok_config.get("chat_template"):
        writer.add_chat_template(tok_config["chat_template"])
    if edit is not None:
        edit(writer)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MINICPM, layers)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            data = f.get_tensor(name).float()
            if name.endswith("q_proj.weight"):
                data = converter_permute(data, hp["num_attention_heads"], hp["num_attention_heads"])
            if name.endswith("k_proj.weight"):
                data = converter_permute(data, hp["num_attention_heads"], hp["num_key_value_heads"])
            new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            _add(writer, new_name, data.numpy(), tensor_type)
    if rope.get("rope_type") == "longrope":
        for key, tensor in (("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                            ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
            assert len(rope[key]) == hp["hidden_size"] // hp["num_attention_heads"] / 2
            _add(writer, gguf.TENSOR_NAMES[tensor] + ".weight", np.array(rope[key], dtype=np.float32), None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add(writer: gguf.GGUFWriter, name: str, data: np.ndarray,
         tensor_type: Callable[[str], gguf.GGMLQuantizationType] | None) -> None:
    kind = tensor_type(name) if tensor_type is not None else gguf.GGMLQuantizationType.F32
    if kind == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    elif kind in (gguf.GGMLQuantizationType.Q8_1, gguf.GGMLQuantizationType.Q8_K):
        # types gguf-py cannot (de)quantize: zero blocks of the right byte size
        block, size = gguf.GGML_QUANT_SIZES[kind]
        writer.add_tensor(name, np.zeros((data.shape[0], data.shape[1] // block * size), dtype=np.uint8),
                          raw_dtype=kind)
    else:
        packed = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), kind)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)

