"""Synthetic MiniCPM checkpoints in the exact Hugging Face layout (no MiniCPM weights can be
downloaded here): config.json with every MiniCPM field, generation_config.json,
model.safetensors (or shards + index), and a working tokenizer. Weights are deterministic
random numbers whose next-token distributions are peaked (not flat), so accuracy metrics mean
something.

    python -m model.synthetic OUT_DIR --preset tiny|0.5b|8b|4.1-8b|tiny-sala|sala [--seed N] [--shards N]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from hal import env
from hal.errors import HalError
from model import gptq
from model.checkpoint import INDEX, QUANTIZED, SINGLE, expected_shapes
from model.config import parse_config
from model.safetensors_mmap import write_safetensors


def _geometric(first: float, last: float, count: int) -> list[float]:
    return [first * (last / first) ** (i / (count - 1)) for i in range(count)]


SPARSE_CONFIG_8B = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 2048,
                    "topk": 64, "use_nope": False, "dense_len": 8192}
"""MiniCPM4-8B's ``sparse_config`` (InfLLM-v2)."""


def _config(preset: str) -> dict[str, Any]:
    base = {
        "architectures": ["MiniCPMForCausalLM"],
        "model_type": "minicpm",
        "auto_map": {
            "AutoConfig": "configuration_minicpm.MiniCPMConfig",
            "AutoModel": "modeling_minicpm.MiniCPMModel",
            "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
        },
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.1,
        "rope_theta": 10000.0,
        "scale_emb": 12,
        "scale_depth": 1.4,
        "dim_model_base": 256,
        "bos_token_id": 1,
        "eos_token_id": [2, None],  # second id filled with <|im_end|> = vocab_size - 8
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
    }
    if preset == "tiny":
        head_dim = 32
        base.update(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                    rms_norm_eps=1e-5, dim_model_base=32, tie_word_embeddings=True)
        # max_position_embeddings > original: long factors and mscale != 1 are exercised.
        base["rope_scaling"] = {"rope_type": "longrope", "original_max_position_embeddings": 2048,
                                "long_factor": _geometric(1.0, 8.0, head_dim // 2),
                                "short_factor": _geometric(1.0, 2.0, head_dim // 2)}
    elif preset == "0.5b":
        base.update(vocab_size=73448, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                    rms_norm_eps=1e-5, tie_word_embeddings=True)
        factors = _geometric(1.0004, 49.8534, 32)
        base["rope_scaling"] = {"rope_type": "longrope", "original_max_position_embeddings": 32768,
                                "long_factor": factors, "short_factor": factors}
    elif preset in ("8b", "4.1-8b"):
        length = 65536 if preset == "4.1-8b" else 32768
        base.update(vocab_size=73448, hidden_size=4096, intermediate_size=16384, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=2, max_position_embeddings=length,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=2, mup_denominator=32)
        factors = _geometric(0.9978, 31.0239, 64)
        base["rope_scaling"] = {"rope_type": "longrope", "original_max_position_embeddings": length,
                                "long_factor": factors, "short_factor": factors}
        base["sparse_config"] = dict(SPARSE_CONFIG_8B)
    elif preset in ("tiny-sala", "sala"):
        base.update(_sala_fields(preset))
    else:
        raise HalError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    base["eos_token_id"] = [2, base["vocab_size"] - 8]
    return base


PRESETS = ("tiny", "0.5b", "8b", "4.1-8b", "tiny-sala", "sala")
SALA_MIXERS = "S L L L L L L L L S L L L L L L S S L L L L S L L L L L L S S S".split()
"""MiniCPM-SALA's layer layout (research/sala_spec.md §2): S = "minicpm4" (InfLLM-v2, NoPE), L = lightning."""


def _sala_fields(preset: str) -> dict[str, Any]:
    """MiniCPM-SALA's config.json fields (sala_spec.md §1); tiny-sala: 4 layers S L L S, 128 wide,
    with a scaled-down sparse_config (sparse from 64 tokens) so tests reach the sparse path."""
    names = {"S": "minicpm4", "L": "lightning-attn"}
    fields: dict[str, Any] = {
        "architectures": ["MiniCPMSALAForCausalLM"], "model_type": "minicpm_sala", "rope_scaling": None,
        "lightning_scale": "1/sqrt(d)", "lightning_use_rope": True, "attn_use_rope": False,
        "attn_use_output_gate": True, "use_output_gate": True, "use_output_norm": True, "qk_norm": True,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "pad_token_id": 2,
    }
    fields["auto_map"] = {"AutoConfig": "configuration_minicpm_sala.MiniCPMSALAConfig",
                          "AutoModelForCausalLM": "modeling_minicpm_sala.MiniCPMSALAForCausalLM"}
    if preset == "sala":
        fields.update(vocab_size=73448, hidden_size=4096, intermediate_size=16384, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=2, head_dim=128, lightning_nh=32,
                      lightning_nkv=32, lightning_head_dim=128, max_position_embeddings=524288,
                      mixer_types=[names[m] for m in SALA_MIXERS], sparse_config=dict(SPARSE_CONFIG_8B))
    else:
        fields.update(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, lightning_nh=4, lightning_nkv=4,
                      lightning_head_dim=32, max_position_embeddings=4096, dim_model_base=32,
                      mixer_types=[names[m] for m in "SLLS"],
                      sparse_config={"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16,
                                     "window_size": 32, "topk": 3, "use_nope": False, "dense_len": 64})
    return fields


EMBED_STD = 0.02
LOGIT_SPREAD_AT_1K = 3.5


def _weights(config_dict: dict[str, Any], seed: int, dtype: torch.dtype):
    """Deterministic weights, yielded tensor by tensor (an 8B checkpoint never sits in memory).

    Projections ~ N(0, 1/fan_in) keep the residual stream O(1); norm weights ~ 1 + N(0, 0.1).
    Embeddings ~ N(0, 0.02²): small next to the branch outputs, so the model does not just
    echo its input token. The final norm's gain then sets the logit spread to
    3.5·sqrt(ln V / ln 1024) nats, which gives peaked next-token distributions (mean top-1
    probability ~0.4 on the tiny preset) at any vocabulary size."""
    if config_dict.get("quantization_config") is not None:
        yield from _gptq_weights(config_dict, seed, dtype)
        return
    config = parse_config(config_dict)
    generator = torch.Generator().manual_seed(seed)
    spread = LOGIT_SPREAD_AT_1K * math.sqrt(math.log(config.vocab_size) / math.log(1024))
    gain = spread * math.sqrt(config.hidden_size) / (EMBED_STD * config.dim_model_base)
    for name, shape in expected_shapes(config).items():
        if name == "model.norm.weight":
            t = gain * (1.0 + 0.1 * torch.randn(shape, generator=generator))
        elif name.endswith("norm.weight"):  # layernorms; SALA's q_norm / k_norm / o_norm
            t = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = EMBED_STD * torch.randn(shape, generator=generator)
        else:
            t = torch.randn(shape, generator=generator) / math.sqrt(shape[1])
        yield name, t.to(dtype)


GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
               "static_groups": True, "lm_head": False, "checkpoint_format": "gptq"}
"""The quantization_config CPM.cu asserts for MiniCPM4 GPTQ checkpoints (research/minicpm4_spec.md §6.2)."""


def _gptq_weights(config_dict: dict[str, Any], seed: int, dtype: torch.dtype):
    """The same weights as the float checkpoint of this seed, the decoder linears quantized
    (``model.gptq.quantize``: round to nearest, symmetric unless quantization_config says
    ``"sym": false``) and stored in GPTQ layout."""
    config = parse_config(config_dict)
    sym = bool(config_dict["quantization_config"].get("sym", True))
    plain = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    for name, tensor in _weights(plain, seed, torch.float32):
        prefix = name.removesuffix(".weight")
        if name.startswith("model.layers.") and prefix.endswith(QUANTIZED):
            for part, value in gptq.quantize(tensor, config.gptq.group_size, config.gptq.zero_offset, sym=sym).items():
                yield f"{prefix}.{part}", value
        else:
            yield name, tensor.to(dtype)


SHARD_BYTES = 2 << 30
"""shards=0 (auto) writes one shard per ~2 GiB of weights: an 8B checkpoint never sits in memory whole."""


def _auto_shards(config_dict: dict[str, Any], dtype: torch.dtype) -> int:
    size = torch.empty(0, dtype=dtype).element_size()
    total = sum(math.prod(shape) * size for shape in expected_shapes(parse_config(config_dict)).values())
    return max(1, math.ceil(total / SHARD_BYTES))


def _write_tensors(out: Path, config_dict: dict[str, Any], seed: int, dtype: torch.dtype,
                   shards: int) -> None:
    shards = shards or _auto_shards(config_dict, dtype)
    if shards <= 1:
        write_safetensors(out / SINGLE, dict(_weights(config_dict, seed, dtype)))
        return
    names = list(expected_shapes(parse_config(config_dict)))
    per_shard = math.ceil(len(names) / shards)
    shards = math.ceil(len(names) / per_shard)  # no empty shards: the file names say how many exist
    weight_map: dict[str, str] = {}
    total = 0
    stream = _weights(config_dict, seed, dtype)
    for index in range(shards):
        chunk = dict(next(stream) for _ in names[index * per_shard:(index + 1) * per_shard])
        filename = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(out / filename, chunk)
        print(f"[minicpm-hal] synthetic checkpoint: wrote {filename}", file=sys.stderr, flush=True)
        total += sum(t.numel() * t.element_size() for t in chunk.values())
        weight_map.update({name: filename for name in chunk})
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                        indent=2))


def write_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0, *, shards: int = 0,
                     dtype: str = "bfloat16", overrides: dict[str, Any] | None = None,
                     quantize_gptq: bool = False) -> Path:
    """Write a complete synthetic checkpoint into ``out_dir`` (created; must not exist or be
    empty). Written into a temporary sibling first and renamed, so no partial folder is left.

    shards: safetensors files (0: one per ~2 GiB, see :data:`SHARD_BYTES`).
    overrides: config.json fields to change (e.g. ``{"tie_word_embeddings": False}``). quantize_gptq:
    store the decoder linears as GPTQ int4 (:data:`GPTQ_CONFIG`)."""
    from model.synthetic_tokenizer import write_tokenizer

    out = Path(out_dir)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise HalError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if out.exists() and not out.is_dir():
        raise HalError(f"{out}: output path exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise HalError(f"{out}: output folder exists and is not empty")
    config_dict = _config(preset)
    config_dict.update(overrides or {})
    if quantize_gptq:
        config_dict.setdefault("quantization_config", dict(GPTQ_CONFIG))
    config_dict["torch_dtype"] = dtype
    parse_config(config_dict)  # the generator must only write valid checkpoints
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise HalError(f"cannot write the checkpoint to {out}: {exc.strerror or exc}") from None
    try:
        (staging / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
        generation = {"do_sample": True, "temperature": 0.8, "top_p": 0.8, "bos_token_id": 1,
                      "eos_token_id": config_dict["eos_token_id"], "pad_token_id": 2}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _write_tensors(staging, config_dict, seed, torch_dtype, shards)
        write_tokenizer(staging, config_dict["vocab_size"], thinking=preset == "4.1-8b")
        (staging / "SYNTHETIC.md").write_text(
            f"Synthetic MiniCPM checkpoint written by minicpm-hal (preset {preset}, seed {seed}).\n"
            "Random weights: for testing the software stack, not a language model.\n")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except OSError as exc:  # disk full, permissions: name the destination, not the staging folder
        shutil.rmtree(staging, ignore_errors=True)
        raise HalError(f"cannot write the checkpoint to {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def default_checkpoint(preset: str = "tiny", seed: int = 0) -> Path:
    """The built-in synthetic checkpoint, generated on first use into the cache folder."""
    path = env.ensure_cache_dir() / f"synthetic-{preset}-seed{seed}"
    if path.exists() and not path.is_dir():
        raise HalError(f"{path}: the cache entry for the built-in {preset} checkpoint is a file, "
                       "not a folder (remove it, or point HAL_CACHE_DIR elsewhere)")
    if not (path / "config.json").is_file():
        print(f"[minicpm-hal] writing the built-in synthetic {preset} checkpoint to {path} (first use)",
              file=sys.stderr)
        if path.exists():
            shutil.rmtree(path)  # a folder without config.json: an unfinished copy from an older version
        write_checkpoint(path, preset, seed)
    return path


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=0,
                        help="write N safetensors shards + index (default: one per ~2 GiB of weights)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--gptq", action="store_true", help="store the decoder linears as GPTQ int4 (group 128)")
    args = parser.parse_args(argv)
    if args.shards < 0:
        raise HalError(f"--shards must be >= 0 (0: one per ~2 GiB), got {args.shards}")
    path = write_checkpoint(args.out_dir, args.preset, args.seed, shards=args.shards, dtype=args.dtype,
                            quantize_gptq=args.gptq)
    print(f"wrote synthetic {args.preset} checkpoint (seed {args.seed}) to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit codes and signals as every CLI (``hal/cli.py``): SIGINT/SIGTERM leave no staging folder."""
    from hal.cli import run_main

    return run_main(_main, argv, "model.synthetic")


if __name__ == "__main__":
    sys.exit(main())
