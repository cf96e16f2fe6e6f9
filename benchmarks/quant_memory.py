"""Weight memory of a model kept quantized, per format, against the same model in dense bfloat16.

    python -m benchmarks.quant_memory [--gguf SmolLM2.Q4_1.gguf] [--q4-0 FILE.gguf] [--preset 0.5b] [--no-gguf]
                                      [--json OUT]

For each format the model is loaded on the CPU in bfloat16 in a fresh process, and two numbers
are taken: the weight bytes the model holds (``validation.quantization.describe``: dense tensors
plus each quantized linear as prepared by the bound implementation plus the lm_head's packed float16
copy where ``cpu.fbgemm`` serves logits; the checkpoint containers' bytes beside them) and the process
RSS after loading minus the RSS before (same imports; freed heap returned to the OS with ``malloc_trim``
before each reading), and how much of that RSS is pages of mapped files. Each
is given as a ratio to dense bfloat16, for the whole model and for the decoder linears only (the
embedding, 28.3M of SmolLM2-135M's 134.5M parameters, is dense except in a GGUF kept quantized,
whose Q8_0 ``token_embd`` stays as its codes: ``model/table.py``).

Formats: ``bf16`` (the GGUF decoded at load into bfloat16), the GGUF kept quantized (Q4_1; Q4_0
with ``--q4-0``), and ``python -m model.quantize`` outputs of the same weights (gptq-int4 g64: 128 does not divide 576,
int8 per channel, ternary per row packed at load), written once under HAL_CACHE_DIR. Ternary is
measured twice: as the default ``cpu.torch`` prepares it (4-bit codes t + 8 for torch's int4
kernel) and held in 2 bits (``prefer={"linear_ternary": "cpu.torch_2bit"}``,
``backends/cpu/ternary2.py``). ``--preset NAME`` adds a table for a synthetic checkpoint of that
preset (``model.synthetic``, seed 0) written as ternary by ``python -m model.quantize --format
ternary``: dense bfloat16 (its fake-quantized weights), 4-bit codes, 2 bits.
Below the table, for each GGUF kept quantized: the bytes llama.cpp holds for the same file (its
tensor data, memory-mapped as stored), against the same bfloat16 baseline.
``benchmarks.cpu_speed`` may import :func:`measure` for its table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any



def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _file_rss_bytes() -> int:
    """The resident pages of mapped files (``Rss - Anonymous`` in /proc/self/smaps_rollup): a
    safetensors checkpoint loaded zero-copy stays mapped while its dense tensors are views of
    it, and the pages that packing read stay counted in RSS with them."""
    fields = {}
    with open("/proc/self/smaps_rollup", encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if parts[0] in ("Rss:", "Anonymous:"):
                fields[parts[0]] = int(parts[1]) * 1024
    return fields["Rss:"] - fields["Anonymous:"]


def _trim() -> None:
    """Return freed heap to the OS (``model.memory.return_freed_heap``, which ``hal.load_model`` also
    calls), so RSS counts what the model holds, not the arena high-water mark of loading."""
    from model.memory import return_freed_heap

    return_freed_heap()


TERNARY_2BIT = {"linear_ternary": "cpu.torch_2bit"}


def _one(path: str, quantize: str | None, prefer: dict[str, str] | None = None) -> dict[str, Any]:
    """In this process: load ``path`` in bfloat16 on the CPU and measure (see module docstring)."""
    import gc

    import torch

    import hal
    from validation import quantization

    torch.set_num_threads(1)
    gc.collect()
    _trim()
    before, file_before = _rss_bytes(), _file_rss_bytes()
    model = hal.load_model(path, "cpu", "bfloat16", quantize=quantize, prefer=prefer)
    gc.collect()
    _trim()
    after, file_after = _rss_bytes(), _file_rss_bytes()
    q = quantization.describe(model)
    table = quantization.embedding(model)
    embed = table["bytes"]
    dense_embed = 0 if table["impl"] else embed  # a quantized table is not among the dense bytes
    formats = {g["format"] + " -> " + g["impl"] for g in q["groups"]}
    if table["impl"]:
        formats.add(f"embedding {table['format']} -> {table['impl']}")
    return {"rss_bytes": after - before, "file_rss_bytes": file_after - file_before, "weight_bytes": q["weight_bytes"],
            "embedding_bytes": embed, "embedding_format": table["format"], "formats": sorted(formats),
            "dense_linear_bytes": q["weight_bytes"]["dense"] - dense_embed - model.final_norm.numel() * 2
                                  - sum(layer.input_norm.numel() * 2 + layer.post_norm.numel() * 2
                                        for layer in model.layers)}


def _held(w: dict[str, int]) -> int:
    """Weight bytes the model holds: dense tensors, prepared quantized linears, a quantized embedding
    table, the prepared lm_head."""
    return w["dense"] + w["quantized_prepared"] + w.get("embedding", 0) + w.get("lm_head_prepared", 0)


def measure(path: str | Path, quantize: str | None = None, prefer: dict[str, str] | None = None) -> dict[str, Any]:
    """:func:`_one` in a fresh Python process (so RSS is this model's alone)."""
    code = (f"import json, sys; from benchmarks.quant_memory import _one; "
            f"print(json.dumps(_one({str(path)!r}, {quantize!r}, {prefer!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {path}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


Run = tuple[str, Path, "str | None", "dict[str, str] | None"]  # label, path, quantize, prefer


def _checkpoints(gguf: Path, q4_0: Path | None) -> list[Run]:
    from hal.env import cache_dir
    from model.convert import convert
    from model.quantize import quantize

    root = cache_dir() / "quant_memory" / gguf.stem
    dense = root / "float32"
    if not dense.is_dir():
        convert(gguf, dense, "float32")
    runs: list[Run] = [("bf16 (dense)", gguf, "dequantize", None),
                       (f"{gguf.stem.rsplit('.', 1)[-1]} GGUF kept", gguf, None, None)]
    if q4_0 is not None:
        runs.append(("Q4_0 GGUF kept", q4_0, None, None))
    for fmt, args, mode in (("gptq-int4", {"group_size": 64}, None), ("int8", {}, None),
                            ("ternary", {}, "ternary")):
        out = root / fmt
        if not out.is_dir():
            quantize(dense, out, fmt, **args)
        runs.append((f"{fmt} (model.quantize)", out, mode, None))
    runs.append(("ternary 2-bit (model.quantize)", root / "ternary", "ternary", TERNARY_2BIT))
    return runs


def _preset_checkpoints(preset: str) -> list[Run]:
    from hal.env import cache_dir
    from model.quantize import quantize
    from model.synthetic import write_checkpoint

    root = cache_dir() / "quant_memory" / f"synthetic-{preset}"
    source, ternary = root / "bfloat16", root / "ternary"
    if not ternary.is_dir():
        if not source.is_dir():
            write_checkpoint(source, preset, seed=0, dtype="bfloat16")
        quantize(source, ternary, "ternary")
    return [("bf16 (dense, fake-quantized)", ternary, "dequantize", None),
            ("ternary 4-bit codes (cpu.torch)", ternary, "ternary", None),
            ("ternary 2-bit (cpu.torch_2bit)", ternary, "ternary", TERNARY_2BIT)]


def _table(title: str, runs: list[Run]) -> list[dict[str, Any]]:
    """Measure ``runs`` (the first is the bfloat16 baseline) and print their Markdown table."""
    results = []
    for label, path, mode, prefer in runs:
        m = measure(path, mode, prefer)
        results.append({"table": title, "format": label, "path": str(path), "quantize": mode, "prefer": prefer, **m})
        print(f"measured {label}", file=sys.stderr)
    base = results[0]
    base_w = _held(base["weight_bytes"])
    base_lin = base["dense_linear_bytes"]
    print(f"\n{title}\n")
    print("| Format | Linears as | Weight bytes | x bf16 | Linears bytes | x bf16 (linears) | Container "
          "x bf16 (linears) | RSS | x bf16 (RSS) | of which mapped files |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        w = r["weight_bytes"]
        held = _held(w)
        linears = r["dense_linear_bytes"] + w["quantized_prepared"]
        container = r["dense_linear_bytes"] + w["quantized"]
        print(f"| {r['format']} | {'; '.join(r['formats']) or 'dense'} | {held / 1e6:.1f} MB | {held / base_w:.3f} | "
              f"{linears / 1e6:.1f} MB | {linears / base_lin:.3f} | {container / base_lin:.3f} | "
              f"{r['rss_bytes'] / 1e6:.1f} MB | {r['rss_bytes'] / base['rss_bytes']:.3f} | "
              f"{r['file_rss_bytes'] / 1e6:.1f} MB |")
    print(f"\nembedding (dense bf16): {base['embedding_bytes'] / 1e6:.1f} MB = "
          f"{base['embedding_bytes'] / base_w:.1%} of the bf16 weights")
    for r in results:
        if str(r["path"]).endswith(".gguf") and r["quantize"] != "dequantize":
            from benchmarks.cpu_vs_llama import gguf_tensor_bytes

            held = gguf_tensor_bytes(Path(r["path"]))
            r["llama_cpp_weight_bytes"] = held
            plain = base_w - base["weight_bytes"].get("lm_head_prepared", 0)  # dense bf16 without a packed head
            print(f"llama.cpp on {Path(r['path']).name}: {held / 1e6:.1f} MB of weights (the file's tensor data, "
                  f"memory-mapped as stored) = {held / base_w:.3f}x ({held / plain:.3f}x of the dense bfloat16 "
                  f"weights without the packed lm_head, {plain / 1e6:.1f} MB); ours {_held(r['weight_bytes']) / held:.2f}x that")
    for r in results:
        if r.get("embedding_format", "dense").split()[0] != "dense":
            print(f"{r['format']}: embedding kept {r['embedding_format']}, {r['embedding_bytes'] / 1e6:.1f} MB")
        extra = r["weight_bytes"].get("lm_head_prepared", 0)
        if extra:
            print(f"{r['format']}: weight bytes include the lm_head packed for cpu.fbgemm, {extra / 1e6:.1f} MB "
                  "beside the embedding")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None,
                   help="default: the trained SmolLM2-135M-Instruct (python -m model.trained --fetch)")
    p.add_argument("--q4-0", type=Path, default=None, help="a Q4_0 GGUF of the same model")
    p.add_argument("--preset", action="append", default=[], help="also a synthetic preset written as ternary")
    p.add_argument("--no-gguf", action="store_true", help="only the --preset tables")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    results = []
    if not args.no_gguf:
        if args.gguf is None:
            from model.trained import trained_gguf

            args.gguf = trained_gguf()
        results += _table(f"{args.gguf.name} and its model.quantize outputs", _checkpoints(args.gguf, args.q4_0))
    for preset in args.preset:
        results += _table(f"synthetic {preset} written as ternary (model.quantize --format ternary)",
                          _preset_checkpoints(preset))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
