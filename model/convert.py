"""Convert a GGUF checkpoint into our Hugging Face layout.

    python -m model.convert IN.gguf OUT_DIR [--dtype float32|bfloat16|float16]

Writes config.json, model.safetensors (the ``safetensors`` library; HF tensor names and row order,
q/k un-permuted, weights dequantized into ``--dtype``), tokenizer.json, tokenizer_config.json (with
the chat template), special_tokens_map.json and generation_config.json. The folder is written
under a temporary name beside OUT_DIR and renamed at the end, so a failure or Ctrl-C leaves no
partial folder. With the default float32 the folder loads to exactly the GGUF's weights.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hal.errors import InputError

EXIT_OK = 0
DTYPES = ("float32", "bfloat16", "float16")


def _json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _tokenizer_files(file, staging: Path, config: dict[str, Any]) -> None:
    from model.gguf_tokenizer import build_backend

    backend, settings = build_backend(file)
    backend.save(str(staging / "tokenizer.json"))
    specials = {k: settings[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in settings}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": settings["add_bos_token"],
        "add_eos_token": settings["add_eos_token"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "chat_template" in settings:
        tokenizer_config["chat_template"] = settings["chat_template"]
    _json(staging / "tokenizer_config.json", tokenizer_config)
    _json(staging / "special_tokens_map.json", specials)


def _default_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder (and safetensors a 0600 file): give the result the
    permissions a plain mkdir / open would (the umask's)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~mask)


def convert(source: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the Hugging Face-layout folder ``out_dir`` (must not exist, or be empty) from the GGUF
    file ``source``. Returns ``out_dir``. Raises CheckpointError / InputError."""
    import torch
    from safetensors.torch import save_file

    from model.checkpoint import SINGLE
    from model.config import parse_config
    from model.gguf_checkpoint import config_dict, iter_hf_tensors, load_gguf_config
    from model.gguf_file import GGUFFile

    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: output folder exists and is not empty")
    file = GGUFFile(source)
    config = load_gguf_config(file)
    data = config_dict(file)
    data["torch_dtype"] = dtype
    parse_config(data, source=f"{out}/config.json")  # what is written must load
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _json(staging / "config.json", data)
        generation = {"do_sample": False, "bos_token_id": data["bos_token_id"],
                      "eos_token_id": data["eos_token_id"], "pad_token_id": data["pad_token_id"]}
        _json(staging / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
        _tokenizer_files(file, staging, data)
        torch_dtype = getattr(torch, dtype)
        tensors = dict(iter_hf_tensors(file, config, torch_dtype))
        save_file(tensors, str(staging / SINGLE), metadata={"format": "pt", "source": Path(source).name})
        del tensors
        _default_permissions(staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the .gguf file (architectures minicpm, llama)")
    parser.add_argument("out_dir", type=Path, help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="dtype of model.safetensors (default: float32, exact)")
    args = parser.parse_args(argv)
    out = convert(args.source, args.out_dir, args.dtype)
    print(f"wrote {out} (config.json, model.safetensors, tokenizer and generation files) from {args.source}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """The CLI under the project's exit-code rule (hal/cli.py): a bad input is one line and 2, an
    interrupt 130 (the output is written atomically: nothing is left either way)."""
    from hal.cli import run_main

    return run_main(_main, argv, "model.convert")


if __name__ == "__main__":
    sys.exit(main())
