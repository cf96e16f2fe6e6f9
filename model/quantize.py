"""Quantize a Hugging Face-layout checkpoint's decoder linears (round to nearest: for tests and demos).

    python -m model.quantize SRC DST --format gptq-int4|int8|ternary [--group-size N] [--asym]
                             [--checkpoint-format gptq|gptq_v2]

Formats written (the loader reads each one; embeddings, norms and lm_head are copied as they are):

``gptq-int4``  AutoGPTQ's layout: ``<linear>.qweight`` int32 `[K/8, N]`, ``.qzeros`` int32 `[G, N/8]`,
               ``.scales`` float16 `[G, N]`, ``.g_idx`` int32 `[K]` (``model/gptq.py``), and
               ``quantization_config`` {"quant_method": "gptq", "bits": 4, "group_size": N,
               "desc_act": false, "sym": ..., "checkpoint_format": ...} in config.json
               (default group 128, symmetric, checkpoint_format "gptq").
``int8``       ``<linear>.weight_int8`` int8 `[O, K]` + ``<linear>.weight_scale`` float32 `[O, G]`
               (``w = scale * q``, scale = max|w| / 127 per group) with quantization_config
               {"quant_method": "hal_int8", "bits": 8, "group_size": N}; default -1 (per channel).
``ternary``    BitCPM4's own format: the dense checkpoint with each linear fake-quantized to
               {-s, 0, +s} per group (``model/ternary.py``), no quantization_config; it loads
               dense by default and packed with ``hal.load_model(..., quantize="ternary")``.
               Default group -1 (per row).

DST is written under a temporary name beside it and renamed at the end: a failure leaves nothing.
Errors (unknown format, a group size that does not divide K, a source already quantized) are one
line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from hal.errors import InputError

FORMATS = ("gptq-int4", "int8", "ternary")
EXIT_OK = 0
DEFAULT_GROUP = {"gptq-int4": 128, "int8": -1, "ternary": -1}


def _linear_names(config) -> list[str]:
    from model.checkpoint import QUANTIZED, expected_shapes

    return [n for n in expected_shapes(config)
            if n.startswith("model.layers.") and n.removesuffix(".weight").endswith(QUANTIZED)]


def _check_groups(config, names: list[str], group: int, shapes: dict[str, tuple[int, ...]]) -> None:
    if group == 0 or group < -1:
        raise InputError(f"--group-size must be -1 (one group per row) or > 0, got {group}")
    for name in names:
        k = shapes[name][1]
        if group > 0 and k % group:
            raise InputError(f"--group-size {group} does not divide the input size {k} of '{name}'")


def quantize_tensors(tensors: dict[str, torch.Tensor], names: list[str], fmt: str, group: int, sym: bool,
                     offset: int) -> dict[str, torch.Tensor]:
    """HF-named tensors -> the tensors of ``fmt`` (module docstring); ``names``: the linears."""
    from model import gptq, ternary

    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name not in names:
            out[name] = tensor
            continue
        prefix = name.removesuffix("weight")
        if fmt == "gptq-int4":
            for part, value in gptq.quantize(tensor, group, offset, sym=sym).items():
                out[prefix + part] = value
        elif fmt == "int8":
            n, k = tensor.shape
            g = k if group < 0 else group
            blocks = tensor.float().reshape(n, k // g, g)
            scales = (blocks.abs().amax(dim=-1) / 127).clamp(min=1e-12)
            q = (blocks / scales[..., None]).round().clamp(-127, 127).to(torch.int8)
            out[prefix + "weight_int8"] = q.reshape(n, k).contiguous()
            out[prefix + "weight_scale"] = scales.contiguous()
        else:
            out[name] = ternary.fake_quantize(tensor, group, tensor.dtype).contiguous()
    return out


def quantize(source: str | Path, out_dir: str | Path, fmt: str, group_size: int | None = None,
             sym: bool = True, checkpoint_format: str = "gptq") -> Path:
    """Write ``out_dir`` (must not exist, or be empty) from the checkpoint folder ``source``."""
    from safetensors.torch import save_file

    from model.checkpoint import SINGLE, CheckpointReader
    from model.config import INT8_METHOD, load_config, parse_config

    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise InputError(f"--checkpoint-format must be gptq or gptq_v2, got {checkpoint_format!r}")
    src, out = Path(source), Path(out_dir)
    if not src.is_dir():
        raise InputError(f"{src}: checkpoint folder not found (a .gguf converts first: python -m model.convert)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: output folder exists and is not empty")
    config = load_config(src)
    if config.gptq is not None or config.int8 is not None:
        raise InputError(f"{src}: the checkpoint is already quantized (config.json quantization_config)")
    group = DEFAULT_GROUP[fmt] if group_size is None else group_size
    names = _linear_names(config)
    reader = CheckpointReader(src, config)
    shapes = {n: tuple(reader.location[n].entries[n].shape) for n in names}
    _check_groups(config, names, group, shapes)
    data = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if fmt == "gptq-int4":
        data["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
                                       "sym": sym, "static_groups": False, "lm_head": False,
                                       "checkpoint_format": checkpoint_format}
    elif fmt == "int8":
        data["quantization_config"] = {"quant_method": INT8_METHOD, "bits": 8, "group_size": group}
    parse_config(data, source=f"{out}/config.json")  # what is written must load
    tensors = {name: tensor for name, tensor in reader.tensors(torch.float32 if fmt != "ternary" else None, torch.device("cpu"))}
    tensors = quantize_tensors(tensors, names, fmt, group, sym, 1 if checkpoint_format == "gptq" else 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        for item in src.iterdir():  # tokenizer, generation config, ...: everything but the weights
            if item.is_file() and not item.name.endswith(".safetensors") and item.name != "model.safetensors.index.json":
                shutil.copy2(item, staging / item.name)
        (staging / "config.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / SINGLE),
                  metadata={"format": "pt", "quantized": fmt})
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="checkpoint folder (Hugging Face layout, not quantized)")
    parser.add_argument("out_dir", type=Path, help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--group-size", type=int, default=None,
                        help="inputs per scale group, -1 one per row (default: gptq-int4 128, int8 -1, ternary -1)")
    parser.add_argument("--asym", action="store_true", help="gptq-int4: asymmetric (a zero point per group)")
    parser.add_argument("--checkpoint-format", default="gptq", help="gptq-int4: gptq (zero - 1 stored) or gptq_v2")
    args = parser.parse_args(argv)
    out = quantize(args.source, args.out_dir, args.format, args.group_size, not args.asym, args.checkpoint_format)
    print(f"wrote {out} ({args.format}) from {args.source}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """The CLI under the project's exit-code rule (hal/cli.py): a bad input is one line and 2, an
    interrupt 130 (the output is written atomically: nothing is left either way)."""
    from hal.cli import run_main

    return run_main(_main, argv, "model.quantize")


if __name__ == "__main__":
    sys.exit(main())
