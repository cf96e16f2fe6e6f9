"""Batch-1 greedy decode on a GPU, side by side in one run:

    python -m benchmarks.gpu_decode --out decode.json                 # cuda, bfloat16
    TRITON_INTERPRET=1 python -m benchmarks.gpu_decode --dry-run --out dry.json   # CPU check

- ``vs_transformers``: the 0.5b preset, ours (eager and decode graph) against transformers'
  ``LlamaForCausalLM`` on the same folded weights (benchmarks/hf_llama.py), eager and sdpa
  attention, each with its own cache. Targets: >= 10x eager, >= 2x sdpa.
- ``int4_vs_bf16``: the 0.5b preset quantized to GPTQ int4 (group 128, symmetric, round to
  nearest: ``write_checkpoint(quantize_gptq=True)``), loaded quantized (``linear_int4`` on the
  Triton GEMV/GEMM of backends/cuda/quant_linear.py), against the same preset in bfloat16 of this
  run. Target (issue 13): >= 1.5x.
- ``roofline``: the 8b preset's geometry (``--roofline-layers`` of its 32 decoder layers, to keep
  the checkpoint small; every layer is the same, so the fraction of the roofline does not depend
  on the count), decode graph: weight bytes read per token / seconds per token, against the
  device-to-device copy bandwidth measured in the same run. Target: >= 70%.

``--dry-run``: the tiny preset on the CPU with few tokens and the CPU ops (no graphs there):
checks the script, the times mean nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

PROMPT = 128


def _prompt(vocab: int, tokens: int) -> torch.Tensor:
    return torch.tensor([[(17 * i) % (vocab - 10) + 3 for i in range(tokens)]])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ours(path: Path, device: str, dtype: str, steps: int, graph: bool) -> dict[str, Any]:
    """Our decode tokens/s (eager, and with a decode graph where the device has graphs)."""
    import hal
    from benchmarks.decode_graph import measure

    model = hal.load_model(path, device, dtype)
    result = measure(model, steps, decode_graph=graph)
    result["bound_ops"] = {op: b.impl for op, b in model.ops.record.items()
                           if op in ("attention_decode", "linear", "linear_int4", "block_sparse_attention",
                                     "lightning_attention")}
    del model
    return result


def transformers_decode(path: Path, device: str, dtype: str, steps: int, attn: str, prompt_tokens: int) -> float:
    """Greedy decode tokens/s of transformers' LlamaForCausalLM (folded weights, DynamicCache)."""
    from transformers import DynamicCache

    from benchmarks.hf_llama import load_folded_llama

    model = load_folded_llama(path, {"bfloat16": torch.bfloat16, "float16": torch.float16,
                                     "float32": torch.float32}[dtype], attn_implementation=attn).to(device)
    ids = _prompt(model.config.vocab_size, prompt_tokens).to(device)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1)
        for _ in range(2):  # warm-up steps
            out = model(input_ids=token[:, None], cache=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1)
        _sync(device)
        began = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token[:, None], cache=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1)
            int(token[0])  # a host read per token, as ours does
        _sync(device)
    seconds = time.perf_counter() - began
    del model
    return steps / seconds


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of every tensor a decode step reads: all weights but the input embedding table
    (one row of it), which is read in full only when it is also the tied lm_head."""
    from safetensors import safe_open

    config = json.loads((path / "config.json").read_text())
    total, embedding = 0, 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                count = 1
                for n in sl.get_shape():
                    count *= n
                size = count * {"BF16": 2, "F16": 2, "F32": 4}.get(sl.get_dtype(), 2)
                total += size
                if name.endswith("embed_tokens.weight"):
                    embedding = size
    return total if config.get("tie_word_embeddings", False) else total - embedding


def copy_gb_per_s(device: str, megabytes: int) -> float:
    from benchmarks.gpu_attention import copy_bandwidth, timer

    return copy_bandwidth(device, timer(device), megabytes)["gb_per_s"]


def int4_decode(dry_run: bool, device: str, dtype: str, steps: int, graph: bool, cache_dir: Path,
                dense_tokens_per_s: float) -> dict[str, Any]:
    """The GPTQ int4 twin of the small preset against its dense decode measured in this run."""
    from model.synthetic import write_checkpoint

    preset = "tiny" if dry_run else "0.5b"
    path = cache_dir / f"synthetic-{preset}-gptq-int4-g128"
    if not (path / "config.json").is_file():
        write_checkpoint(path, preset, quantize_gptq=True)
    result = ours(path, device, dtype, steps, graph)
    tokens_per_s = result.get("graph_decode_tokens_per_s", result["decode_tokens_per_s"])
    return {"checkpoint": path.name, "ours": result, "int4_tokens_per_s": tokens_per_s,
            "dense_tokens_per_s": dense_tokens_per_s, "int4_over_dense": tokens_per_s / dense_tokens_per_s,
            "target": 1.5}


def run(dry_run: bool, device: str, dtype: str, steps: int, roofline_layers: int, cache_dir: Path) -> dict[str, Any]:
    from model.synthetic import default_checkpoint, write_checkpoint

    out: dict[str, Any] = {"device": device, "dtype": dtype, "dry_run": dry_run, "new_tokens": steps}
    if device == "cuda":
        out["card"] = torch.cuda.get_device_name(0)
    small = default_checkpoint("tiny" if dry_run else "0.5b")
    graph = device == "cuda"
    mine = ours(small, device, dtype, steps, graph)
    eager = transformers_decode(small, device, dtype, steps, "eager", PROMPT)
    sdpa = transformers_decode(small, device, dtype, steps, "sdpa", PROMPT)
    best = mine.get("graph_decode_tokens_per_s", mine["decode_tokens_per_s"])
    out["vs_transformers"] = {"checkpoint": small.name, "ours": mine, "transformers_eager_tokens_per_s": eager,
                              "transformers_sdpa_tokens_per_s": sdpa, "ours_over_eager": best / eager,
                              "ours_over_sdpa": best / sdpa, "targets": {"over_eager": 10.0, "over_sdpa": 2.0}}
    out["int4_vs_bf16"] = int4_decode(dry_run, device, dtype, steps, graph, cache_dir, best)
    preset = "tiny" if dry_run else "8b"
    big = cache_dir / f"synthetic-{preset}-{roofline_layers}layers"
    if not (big / "config.json").is_file():
        write_checkpoint(big, preset, overrides={"num_hidden_layers": roofline_layers})
    result = ours(big, device, dtype, steps, graph)
    tokens_per_s = result.get("graph_decode_tokens_per_s", result["decode_tokens_per_s"])
    weights = weight_bytes_per_token(big)
    bandwidth = copy_gb_per_s(device, 16 if dry_run else 1024)
    achieved = weights * tokens_per_s / 1e9
    out["roofline"] = {"checkpoint": big.name, "layers": roofline_layers, "weight_bytes_per_token": weights,
                       "decode_tokens_per_s": tokens_per_s, "achieved_gb_per_s": achieved,
                       "copy_gb_per_s": bandwidth, "fraction_of_roofline": achieved / bandwidth, "target": 0.7,
                       "ours": result}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--roofline-layers", type=int, default=8, help="decoder layers of the 8b roofline checkpoint")
    p.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    from hal import env

    device, dtype, steps = "cuda", args.dtype, args.new_tokens
    if args.dry_run:
        device, dtype, steps = "cpu", "float32", 4
    elif not torch.cuda.is_available():
        print("error: device 'cuda' is not available: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    result = run(args.dry_run, device, dtype, steps, args.roofline_layers, env.cache_dir())
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
