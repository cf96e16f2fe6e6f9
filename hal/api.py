"""Public entry point: :func:`load_model`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from hal.probing import resolve as resolve_device
from hal.probing import torch_device
from hal.errors import CheckpointError, InputError
from hal.quant import QuantizedWeight
from hal.registry import BoundOps, bind

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
        raise InputError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise InputError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    return DTYPE_NAMES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


MODEL_HELP = ("checkpoint folder (Hugging Face layout; dense, GPTQ int4, python -m model.quantize int8 or "
              "BitCPM4 ternary) or a .gguf file (llama.cpp; architectures minicpm, llama; Q4_0 / Q4_1 / Q8_0 "
              "kept quantized, other types decoded at load)")
"""The help text of every CLI's ``--model`` option."""


def is_gguf(path: str | Path) -> bool:
    """True when ``path`` names a GGUF file rather than a checkpoint folder."""
    from model.gguf_file import looks_like_gguf

    return not Path(path).is_dir() and looks_like_gguf(path)


def checkpoint_config(path: str | Path):
    """The validated :class:`model.config.MiniCPMConfig` of a checkpoint folder or GGUF file,
    without loading weights. Raises CheckpointError / ConfigError."""
    if is_gguf(path):
        from model.gguf_checkpoint import load_gguf_config, open_checkpoint, parsing_shared
        from model.gguf_file import GGUFFile

        # in a shared-parse scope the parse is kept for the loads that follow
        return open_checkpoint(path).config if parsing_shared() else load_gguf_config(GGUFFile(path))
    from model.config import load_config

    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    return load_config(Path(path))


QUANTIZE_MODES = ("keep", "dequantize", "ternary")
"""``load_model(quantize=...)``: keep the checkpoint's quantized linears quantized (default),
decode them into the model dtype at load (the dense behaviour), or pack fake-quantized ternary
linears (BitCPM4) into ``hal.quant.TernaryWeight``."""


def load_model(path: str | Path, device: str = "auto", dtype: str | torch.dtype | None = None, *,
               reference: bool = False, allow_fallback: bool = False,
               op_overrides: dict[str, Callable[..., Any]] | None = None, quantize: str | None = None,
               tp: int | None = None, prefer: dict[str, str] | None = None):
    """Load a MiniCPM checkpoint (Hugging Face layout, or a GGUF file) and bind it to a device.

    Args:
        path: checkpoint folder (config.json, model.safetensors or a sharded index, tokenizer), or a
            ``.gguf`` file (architectures ``minicpm`` and ``llama``; weights dequantized into
            ``dtype`` at load, tokenizer and chat template from the file's metadata).
        device: ``auto`` (HAL_DEVICE, else npu > cuda > cpu), ``cpu``, ``cuda`` or ``npu`` (or a
            ``torch.device`` of those, index 0).
        dtype: ``float32``/``bfloat16``/``float16`` or a torch dtype. Default: float32 on CPU,
            the checkpoint's torch_dtype elsewhere (bfloat16 for a quantized GGUF).
        reference: bind the float32 reference ops (CPU only): the judge used by validation.
        allow_fallback: run ops the device cannot serve on the CPU reference (listed in
            ``model.bound_ops``). Default: raise UnsupportedOpError.
        op_overrides: op name -> callable replacing the bound implementation (fault injection).
        quantize: ``None`` / ``"keep"``: GPTQ int4 and GGUF Q4_0 / Q4_1 / Q8_0 decoder linears stay
            quantized (``hal.quant`` containers, served by ``linear_int4`` / ``linear_int8``;
            a GGUF's Q4_0 / Q4_1 / Q8_0 token embedding too, a tied lm_head with it, as its codes
            on the CPU in bfloat16 / float16 (``model/table.py``); norms and the rest are dense); ``"dequantize"``: every weight dense in
            ``dtype`` (the old behaviour); ``"ternary"``: also pack the fake-quantized ternary
            linears of a BitCPM4-style checkpoint (``model/ternary.py``; CheckpointError when a
            decoder linear is not ternary). With ``tp`` > 1, ``None`` means ``"dequantize"`` (the
            ranks slice dense weights) and ``"keep"`` / ``"ternary"`` are refused.
        tp: tensor-parallel size (``hal/distributed.py``, ``model/sharding.py``): this process is
            one of ``tp`` ranks (``torchrun --nproc-per-node tp``; the default process group is
            initialised from the launcher's environment unless the caller did) and loads only its
            slice of the weights; logits come back whole (float32, all V) on every rank. Every
            rank must call this; a rank that fails makes every rank raise (the failed rank's line).
            Default: None (one process, as is 1: the launcher's WORLD_SIZE is not checked then).
        prefer: op name -> implementation qualname tried before the priority order, e.g.
            ``{"linear_ternary": "cpu.torch_2bit"}`` (ternary kept in 2 bits on the CPU: 0.13x of
            bfloat16 instead of 0.28x, decode linears ~2x slower; ``backends/cpu/ternary2.py``).
            One that does not support the model (dtype, shapes) is passed over with a warning and
            its reason in ``model.bound_ops``. InputError for an unknown op or implementation.

    Raises:
        DeviceUnavailable, ConfigError, CheckpointError, UnsupportedOpError, InputError,
        DistributedError (another rank failed, or the process group broke).
    """
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise InputError(f"quantize must be one of {', '.join(QUANTIZE_MODES)} (or None), got {quantize!r}")
    kind = resolve_device(device)
    if tp is None or tp == 1:
        return _load(path, kind, dtype, reference, allow_fallback, op_overrides, quantize, None, prefer)
    if quantize in ("keep", "ternary"):
        raise InputError(f"tp={tp}: tensor parallel of quantized weights is not supported (quantize={quantize!r}); "
                         "use quantize='dequantize' (--quantize dequantize) or tp=1")
    from hal import distributed

    group = distributed.setup(kind, tp)  # the same outcome on every rank: nothing below can hang
    model, error = None, None
    try:
        model = _load(path, kind, dtype, reference, allow_fallback, op_overrides, "dequantize", group, prefer)
    except Exception as exc:  # noqa: BLE001 - re-raised by agree() on this rank, reported to the others
        error = exc
    group.agree(error)
    return model


def _load(path: str | Path, kind: str, dtype: str | torch.dtype | None, reference: bool, allow_fallback: bool,
          op_overrides: dict[str, Callable[..., Any]] | None, quantize: str | None, group,
          prefer: dict[str, str] | None = None):
    """:func:`load_model` on one rank; ``group`` (a :class:`hal.distributed.TPGroup`) or None."""
    from model.checkpoint import load_weights
    from model.config import GenerationDefaults, load_config, load_generation_config
    from model.memory import return_freed_heap
    from model.minicpm import MiniCPMForCausalLM

    keep = quantize != "dequantize"
    folder = Path(path)
    opened = None
    if is_gguf(folder):
        from model.gguf_checkpoint import open_checkpoint

        opened = open_checkpoint(folder)  # parsed once per model.gguf_checkpoint.parsed_once scope
        config = opened.config
        generation = GenerationDefaults()
    elif not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    else:
        config = load_config(folder)
        generation = load_generation_config(folder, config.vocab_size)
    if dtype is None:
        dtype = "float32" if kind == "cpu" else config.torch_dtype
    torch_dtype = parse_dtype(dtype)
    if reference and kind != "cpu":
        raise InputError(f"reference=True binds the CPU float32 reference; device must be cpu, got {kind}")
    device = torch_device(kind) if group is None else group.device
    shard = tp = None
    if group is not None:
        from model.sharding import plan
        from model.tp import TensorParallel

        shard = plan(config, group.size, group.rank, source=str(folder))
        tp = TensorParallel(shard, group)
    ops = bind(kind, torch_dtype, config.shapes() if shard is None else shard.shapes(config), reference=reference,
               allow_fallback=allow_fallback, overrides=op_overrides, prefer=prefer)
    tokenizer_loader = None
    decoded: dict[str, str] = {}  # model.checkpoint.DecodedAtLoad
    if opened is None:
        weights = load_weights(folder, config, torch_dtype, device, shard=shard, keep=keep, decoded=decoded)
    else:
        from model.gguf_checkpoint import load_gguf_weights

        tokenizer_loader = opened.tokenizer_loader
        weights = load_gguf_weights(opened.file, config, torch_dtype, device, keep=keep, shard=shard, decoded=decoded)
        del opened  # outside a shared-parse scope this closes the memory map: its pages leave the process
    if quantize == "ternary":
        weights = _pack_ternary(weights, folder)
        decoded = {name: why for name, why in decoded.items() if isinstance(weights.get(name), torch.Tensor)}
    if shard is not None:
        _refuse_quantized(weights, folder, shard.size)
    ops = _bind_for_groups(ops, weights, reference, allow_fallback, op_overrides, prefer)
    model = MiniCPMForCausalLM(config, weights, ops, device, torch_dtype, path=folder,
                               generation=generation, tokenizer_loader=tokenizer_loader, tp=tp,
                               decoded_at_load=decoded)
    del weights  # the model holds what it needs; transient copies of the load go back to the OS
    return_freed_heap()
    return model


def _bind_for_groups(ops: BoundOps, weights: dict[str, Any], reference: bool, allow_fallback: bool,
                     op_overrides: dict[str, Callable[..., Any]] | None,
                     prefer: dict[str, str] | None = None) -> BoundOps:
    """``ops`` bound again with the checkpoint's quantization group size ``G`` in the shapes, so each
    quantized linear's ``supports()`` can pass over a kernel that refuses it (the first binding,
    made before the weights were read, fails fast on an unusable device). ``G`` is the gcd of the
    grouped containers' sizes (per-channel containers, one group per row, are left to ``prepare``)."""
    groups = {w.group_size for w in weights.values()
              if isinstance(w, QuantizedWeight) and w.group_size != w.in_features}
    if not groups:
        return ops
    ctx = ops.context
    return bind(ctx.device, ctx.dtype, {**ctx.shapes, "G": math.gcd(*groups)}, reference=reference,
                allow_fallback=allow_fallback, overrides=op_overrides, prefer=prefer)


def _refuse_quantized(weights: dict[str, Any], path: Path, tp: int) -> None:
    """Tensor parallel slices dense tensors only: a weight kept quantized (not a plain tensor) is refused."""
    kept = next((name for name, w in weights.items() if not isinstance(w, torch.Tensor)), None)
    if kept is not None:
        raise InputError(f"tp={tp}: tensor parallel of quantized weights is not supported ({path}: '{kept}' is "
                         f"kept quantized); use tp=1")


def _pack_ternary(weights: dict[str, Any], where: Path) -> dict[str, Any]:
    from model.ternary import pack_linears

    return pack_linears(weights, where)
