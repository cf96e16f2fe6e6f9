"""An independent implementation of a MiniCPM checkpoint: transformers' ``LlamaForCausalLM`` with the
μP scalars folded into the weights and MiniCPM's LongRoPE mapped onto transformers' ``longrope``.

MiniCPM (remote code) differs from Llama only by three scalars and its LongRoPE factor choice:

* embeddings × ``scale_emb``                            -> fold into ``embed_tokens``
* each residual branch × ``scale_depth / sqrt(L)``      -> fold into ``o_proj`` and ``down_proj``
* final hidden ÷ ``hidden_size / dim_model_base``       -> fold into ``lm_head`` (tied embeddings
  are untied first, so the embedding keeps its own scale)
* LongRoPE: MiniCPM picks ONE factor set for all positions from ``max_position_embeddings`` vs
  ``original_max_position_embeddings`` (long iff max > original) and multiplies cos/sin by
  ``mscale = sqrt(1 + ln(s)/ln(original))``, s = max/original (1 when s <= 1). transformers 5.x
  ``longrope`` instead picks short/long per forward from the current length. Giving transformers
  the chosen set as BOTH ``long_factor`` and ``short_factor`` and ``attention_factor = mscale``
  makes it use exactly MiniCPM's frequencies and scale at every length.

Everything here reads config.json and the safetensors with ``json`` and ``safetensors`` directly,
not through this project's loader, so it stays an independent check. Used by
``tests/test_hf_reference.py`` and the CPU speed benchmarks.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch


def _config_dict(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))


def _read_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint (single file or sharded index), via the safetensors package."""
    from safetensors.torch import load_file

    folder = Path(checkpoint)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(str(folder / shard)))
        return tensors
    return load_file(str(folder / "model.safetensors"))


def minicpm_rope(cfg: dict[str, Any]) -> tuple[list[float] | None, float]:
    """(factor set MiniCPM uses for every position, mscale), computed from config.json as MiniCPM's
    remote ``MiniCPMLongRoPE`` does; (None, 1.0) when there is no longrope scaling."""
    scaling = cfg.get("rope_scaling")
    if not scaling:
        return None, 1.0
    if scaling.get("rope_type") != "longrope":
        raise ValueError(f"unsupported rope_scaling {scaling!r}")
    original = int(scaling["original_max_position_embeddings"])
    max_pos = int(cfg["max_position_embeddings"])
    factors = scaling["long_factor"] if max_pos > original else scaling["short_factor"]
    scale = max_pos / original
    mscale = 1.0 if scale <= 1.0 else math.sqrt(1.0 + math.log(scale) / math.log(original))
    return [float(f) for f in factors], mscale


def llama_config(cfg: dict[str, Any]):
    """A ``LlamaConfig`` equivalent to a MiniCPM config.json (untied; scalars folded separately)."""
    from transformers import LlamaConfig

    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg["hidden_size"]) // heads
    theta = float(cfg.get("rope_theta", 10000.0))
    factors, mscale = minicpm_rope(cfg)
    if factors is None:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    else:
        original = int(cfg["rope_scaling"]["original_max_position_embeddings"])
        rope = {"rope_type": "longrope", "rope_theta": theta, "long_factor": factors, "short_factor": factors,
                "original_max_position_embeddings": original, "attention_factor": mscale,
                "factor": int(cfg["max_position_embeddings"]) / original}
    return LlamaConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
        head_dim=head_dim,
        hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=int(cfg["max_position_embeddings"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_parameters=rope,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=None,
        pad_token_id=None,
    )


def folded_state_dict(cfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Llama state dict with the μP scalars multiplied in (in float32, then cast to ``dtype``)."""
    layers = int(cfg["num_hidden_layers"])
    residual = float(cfg.get("scale_depth", 1.0)) / math.sqrt(layers)
    emb_scale = float(cfg.get("scale_emb", 1.0))
    head_scale = float(cfg.get("dim_model_base", 1.0)) / int(cfg["hidden_size"])
    tied = bool(cfg.get("tie_word_embeddings", True))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name == "lm_head.weight" and tied:
            continue  # a stored copy of a tied head is ignored, as the remote code does
        t = tensor.float()
        if name == "model.embed_tokens.weight":
            t = t * emb_scale
        elif name.endswith("self_attn.o_proj.weight") or name.endswith("mlp.down_proj.weight"):
            t = t * residual
        elif name == "lm_head.weight":
            t = t * head_scale
        out[name] = t.to(dtype).contiguous()
    head_source = tensors["model.embed_tokens.weight"] if tied else tensors["lm_head.weight"]
    out["lm_head.weight"] = (head_source.float() * head_scale).to(dtype).contiguous()
    return out


def load_folded_llama(checkpoint: str | Path, dtype: torch.dtype = torch.float32,
                      attn_implementation: str = "sdpa"):
    """Build transformers' ``LlamaForCausalLM`` for a MiniCPM checkpoint folder, in eval mode.

    The model is created on the meta device and the folded tensors are assigned (no random
    init, one copy of the weights); the rotary buffers are then rebuilt on the CPU."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = _config_dict(Path(checkpoint))
    config = llama_config(cfg)
    config._attn_implementation = attn_implementation
    state = folded_state_dict(cfg, _read_tensors(Path(checkpoint)), dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"folded Llama: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # float32 inv_freq, as from_pretrained has
    model.eval()
    return model
