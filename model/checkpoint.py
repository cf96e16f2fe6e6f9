"""Hugging Face-layout checkpoint loading: safetensors only (single file or sharded index),
memory-mapped, every tensor checked against the shapes the config implies."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

import torch

from hal import quant
from hal.errors import CheckpointError
from model import gptq
from model.config import INT8_METHOD, MiniCPMConfig
from model.safetensors_mmap import SafetensorsFile
from model.sharding import ShardPlan, narrow

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Non-persistent rotary buffers that some exporters still save; harmless, skipped.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def expected_shapes(config: MiniCPMConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a MiniCPM (or MiniCPM-SALA) checkpoint (HF names)."""
    e, f, v, d = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    q_out = config.num_attention_heads * d
    shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        lightning = config.mixer(i) == "lightning"
        kv_out = q_out if lightning else config.num_key_value_heads * d
        shapes.update({
            p + "input_layernorm.weight": (e,),
            p + "self_attn.q_proj.weight": (q_out, e),
            p + "self_attn.k_proj.weight": (kv_out, e),
            p + "self_attn.v_proj.weight": (kv_out, e),
            p + "self_attn.o_proj.weight": (e, q_out),
            p + "post_attention_layernorm.weight": (e,),
            p + "mlp.gate_proj.weight": (f, e),
            p + "mlp.up_proj.weight": (f, e),
            p + "mlp.down_proj.weight": (e, f),
        })
        if lightning:
            spec = config.lightning
            if spec.output_gate:
                shapes[p + "self_attn.z_proj.weight"] = (q_out, e)
            if spec.qk_norm:
                shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
            if spec.output_norm:
                shapes[p + "self_attn.o_norm.weight"] = (q_out,)
        elif config.attn_output_gate:
            shapes[p + "self_attn.o_gate.weight"] = (q_out, e)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, e)
    if config.gptq is not None:
        return _gptq_shapes(shapes, config)
    return _int8_shapes(shapes, config) if config.int8 is not None else shapes


QUANTIZED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")
"""The decoder-layer linears a GPTQ checkpoint stores packed (embeddings, norms and lm_head stay float)."""
INTEGER_PARTS = (".qweight", ".qzeros", ".g_idx")
MIN_TENSORS_PER_LAYER = 9  # two norms, q/k/v/o, gate/up/down (see expected_shapes)
MIN_TENSORS_PER_LAYER_GPTQ = 2 + 4 * len(QUANTIZED)  # norms + qweight/qzeros/scales/g_idx per linear


def _packed_shapes(shapes: dict[str, tuple[int, ...]], group_size: int,
                   parts: Callable[[int, int, int], dict[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    """Each decoder linear's ``<linear>.weight`` `[N, K]` replaced by the shapes of its stored parts,
    ``parts(N, K, G)`` (suffix -> shape; G groups per row, 1 for group_size -1)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        prefix = name.removesuffix(".weight")
        if not (name.startswith("model.layers.") and prefix.endswith(QUANTIZED)):
            out[name] = shape
            continue
        n, k = shape
        groups = 1 if group_size < 0 else k // group_size
        out.update({prefix + suffix: part for suffix, part in parts(n, k, groups).items()})
    return out


def _gptq_shapes(shapes: dict[str, tuple[int, ...]], config: MiniCPMConfig) -> dict[str, tuple[int, ...]]:
    """``<linear>.weight`` `[N, K]` -> qweight `[K/8, N]`, qzeros `[G, N/8]`, scales `[G, N]`, g_idx `[K]`."""
    return _packed_shapes(shapes, config.gptq.group_size, lambda n, k, g: {
        ".qweight": (k // 8, n), ".qzeros": (g, n // 8), ".scales": (g, n), ".g_idx": (k,)})


INT8_PARTS = ("weight_int8", "weight_scale")
"""``hal_int8`` checkpoints (``model.config.Int8Linears``): the tensors of one int8 linear."""


def _int8_shapes(shapes: dict[str, tuple[int, ...]], config: MiniCPMConfig) -> dict[str, tuple[int, ...]]:
    """``<linear>.weight`` `[N, K]` -> weight_int8 `[N, K]`, weight_scale `[N, G]`."""
    return _packed_shapes(shapes, config.int8.group_size, lambda n, k, g: {
        ".weight_int8": (n, k), ".weight_scale": (n, g)})


def _shard_files(checkpoint: Path) -> dict[str, Path]:
    """Tensor name -> file holding it."""
    index = checkpoint / INDEX
    single = checkpoint / SINGLE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: malformed index ({type(exc).__name__}: {exc})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must be an object")
        files = {}
        for name, shard in weight_map.items():
            if (not isinstance(shard, str) or "/" in shard or "\\" in shard
                    or not shard.endswith(".safetensors")):
                raise CheckpointError(f"{index}: tensor '{name}' maps to a bad shard name {shard!r}")
            files[name] = checkpoint / shard
        return files
    if single.is_file():
        return {}
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in checkpoint.glob(pattern))
    if pickles:
        raise CheckpointError(f"{checkpoint}: only pickle weights found ({', '.join(pickles[:3])}); pickle "
                              "checkpoints are refused (they can run code): convert them to safetensors")
    raise CheckpointError(f"{checkpoint}: no {SINGLE} or {INDEX} found")


class CheckpointReader:
    """Opens the checkpoint's safetensors files and yields validated tensors one at a time."""

    def __init__(self, checkpoint: Path, config: MiniCPMConfig):
        self.checkpoint = Path(checkpoint)
        self.config = config
        names_to_file = _shard_files(self.checkpoint)
        self.files: dict[Path, SafetensorsFile] = {}
        self.location: dict[str, SafetensorsFile] = {}
        if names_to_file:
            for name, path in names_to_file.items():
                if not path.is_file():
                    raise CheckpointError(f"{path}: shard listed in {INDEX} for '{name}' is missing")
                if path not in self.files:
                    self.files[path] = SafetensorsFile(path)
                if name not in self.files[path].entries:
                    raise CheckpointError(f"{path}: tensor '{name}' listed in {INDEX} is not in the shard")
                self.location[name] = self.files[path]
            self._check_shards_agree_with_index(names_to_file)
        else:
            single = SafetensorsFile(self.checkpoint / SINGLE)
            self.files[single.path] = single
            self.location = {name: single for name in single.entries}
        self._validate()

    def _check_shards_agree_with_index(self, names_to_file: dict[str, Path]) -> None:
        """Every tensor a shard stores is listed in the index, for that shard (a second copy in
        another shard, or one the index does not list, would be silently ignored otherwise)."""
        for path, shard in self.files.items():
            for name in shard.entries:
                listed = names_to_file.get(name)
                if listed is None:
                    raise CheckpointError(f"{path}: tensor '{name}' is stored in this shard but not listed "
                                          f"in {INDEX}")
                if listed != path:
                    raise CheckpointError(f"{path}: tensor '{name}' is stored in two shards ({path.name} and "
                                          f"{listed.name}; {INDEX} names {listed.name})")

    def _check_layer_count(self) -> None:
        """Refuse a config whose layer count is far beyond what this checkpoint holds, before
        building the expected-tensor table (num_hidden_layers = 10**12 would exhaust memory doing
        so). Up to twice the stored count passes here, so a few missing tensors are still named
        one by one by :meth:`_validate`; the table then has at most ~2x the stored entries."""
        per_layer = MIN_TENSORS_PER_LAYER_GPTQ if self.config.gptq is not None else MIN_TENSORS_PER_LAYER
        layers = self.config.num_hidden_layers
        stored = len(self.location)
        if layers * per_layer + 2 > 2 * stored + per_layer:
            raise CheckpointError(f"{self.checkpoint}: config.json num_hidden_layers={layers} needs at least "
                                  f"{layers * per_layer + 2} tensors ({per_layer} per layer), the checkpoint "
                                  f"holds {stored}")

    def _validate(self) -> None:
        self._check_layer_count()
        expected = expected_shapes(self.config)
        present = {n for n in self.location if not IGNORED.fullmatch(n)}
        if self.config.tie_word_embeddings:
            present.discard("lm_head.weight")  # tied: a stored copy is ignored, as in transformers
        missing = sorted(set(expected) - present)
        extra = sorted(present - set(expected))
        where = self.checkpoint
        packed = sorted(n for n in extra if n.endswith(".qweight"))
        if packed and self.config.gptq is None:
            raise CheckpointError(f"{where}: tensor '{packed[0]}' is GPTQ-packed but config.json has no "
                                  "quantization_config")
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise CheckpointError(f"{where}: missing tensor '{missing[0]}'"
                                  + (f", {', '.join(repr(m) for m in missing[1:3])}"
                                     if len(missing) > 1 else "")
                                  + more + " (expected " + str(list(expected[missing[0]])) + ")")
        if extra:
            more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
            raise CheckpointError(f"{where}: unexpected tensor '{extra[0]}'"
                                  + (f", {', '.join(repr(x) for x in extra[1:3])}" if len(extra) > 1 else "")
                                  + more)
        for name, shape in expected.items():
            entry = self.location[name].entries[name]
            if entry.shape != shape:
                raise CheckpointError(f"{self.location[name].path}: tensor '{name}' "
                                      f"has shape {list(entry.shape)}, "
                                      f"expected {list(shape)} from config.json")
            if name.endswith(INT8_PARTS):
                want = torch.int8 if name.endswith(".weight_int8") else torch.float32
                if entry.dtype != want:
                    raise CheckpointError(f"{self.location[name].path}: tensor '{name}' has dtype {entry.dtype}, "
                                          f"expected {dtype_label(want)} ({INT8_METHOD})")
                continue
            integer = name.endswith(INTEGER_PARTS)
            if entry.dtype.is_floating_point == integer or (integer and entry.dtype != torch.int32):
                raise CheckpointError(f"{self.location[name].path}: tensor '{name}' has dtype {entry.dtype}, "
                                      f"expected {'int32 (GPTQ)' if integer else 'a floating-point dtype'}")

    def where(self, name: str) -> Path:
        """The file holding ``name`` (for a quantized ``<linear>.weight``: its qweight's / weight_int8's)."""
        source = (self.location.get(name) or self.location.get(name.removesuffix("weight") + "qweight")
                  or self.location[name + "_int8"])
        return source.path

    def tensors(self, dtype: torch.dtype, device: torch.device,
                shard: ShardPlan | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (name, tensor in dtype on device). Tensors already in the right dtype on CPU are
        zero-copy views of the mapping; a converted one's source pages leave the process with its
        view (``SafetensorsFile.tensor``).
        shard: keep only this tensor-parallel rank's slice (``model/sharding.py``), narrowed on the
        mapped view before any copy (a column slice is copied once, contiguous)."""
        for name in expected_shapes(self.config):
            source = self.location[name]
            raw = source.tensor(name)
            if name.endswith(INTEGER_PARTS + (".scales",) + INT8_PARTS):
                yield name, raw  # GPTQ / int8 parts: built into containers on the CPU by load_weights
                continue
            if shard is not None:
                raw = narrow(raw, shard.part(name))
            if raw.dtype == dtype and device.type == "cpu":
                out = raw.contiguous()
                del raw  # a copied slice's source pages leave now, not one tensor later
                yield name, out
                continue
            converted = raw.to(device=device, dtype=dtype)
            del raw  # its pages leave the process now
            yield name, converted


def check_finite(path: Path, name: str, tensor: torch.Tensor) -> None:
    """Refuse a weight holding NaN or Inf (checked on the loaded copy, so a float16 conversion
    overflow is caught too), naming the tensor, the count and the first index.

    One pass: the sum. A NaN or Inf anywhere makes it non-finite, so a finite sum proves the
    tensor finite; only a non-finite sum (or a finite tensor whose sum overflows) pays for the
    exact ``isfinite`` scan. The sum is ~20x faster than ``isfinite(t).all()`` on the CPU
    (benchmarks/RESULTS.md)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all()):
        return
    flat = tensor.reshape(-1)
    bad = ~torch.isfinite(flat)
    first = int(bad.nonzero()[0])
    value = float(flat[first])
    index = list(torch.unravel_index(torch.tensor(first), tensor.shape)) if tensor.dim() else []
    raise CheckpointError(f"{path}: tensor '{name}' holds {int(bad.sum())} non-finite value(s) in "
                          f"{dtype_label(tensor.dtype)} (first: {value} at {[int(i) for i in index]})")


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                  "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
"""Per layer: fused name -> the checkpoint tensors concatenated (along the output dim) into it.
One GEMM instead of three (q/k/v) or two (gate/up) per layer, as vLLM and CPM.cu load them."""


DecodedAtLoad = dict[str, str]
"""A load's record of the quantized linears it decoded to dense although asked to keep them:
checkpoint name (after fusion, e.g. ``model.layers.3.self_attn.qkv_proj.weight``) -> why. The model
keeps it (``MiniCPMForCausalLM.decoded_at_load``) and the report names them
(``validation/quantization.py``)."""


def load_weights(checkpoint: Path, config: MiniCPMConfig, dtype: torch.dtype,
                 device: torch.device, shard: ShardPlan | None = None, keep: bool = False,
                 decoded: DecodedAtLoad | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``dtype`` on ``device``, GPTQ linears dequantized
    (``model/gptq.py``), with each layer's projections fused as :data:`FUSED` says (the parts
    are not kept; their mapped pages are released). ``keep``: GPTQ linears with plain groups
    stay ``hal.quant.Int4Weight`` containers (on the CPU) instead; ``decoded`` (filled when given) names
    those decoded to dense anyway, and why (:data:`DecodedAtLoad`). shard: only this
    tensor-parallel rank's slices (``model/sharding.py``; each part is sliced before the fusion)."""
    decoded = {} if decoded is None else decoded
    reader = CheckpointReader(checkpoint, config)
    weights: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in reader.tensors(dtype, device, shard):
        part = next((p for p in gptq.PARTS if name.endswith("." + p)), None)
        if part is not None:
            prefix = name[: -len(part)]
            parts = packed.setdefault(prefix, {})
            parts[part] = tensor
            if len(parts) < len(gptq.PARTS):
                continue
            del packed[prefix]
            name, tensor = prefix + "weight", _gptq_linear(reader, prefix, parts, config, dtype, device, keep)
            if keep and isinstance(tensor, torch.Tensor):
                decoded[name] = "g_idx is not in plain groups (e.g. act order): no int4 kernel serves it"
            del parts  # the parts' pages leave the process once the container no longer needs them
        int8_part = next((p for p in INT8_PARTS if name.endswith("." + p)), None)
        if int8_part is not None:
            prefix = name[: -len(int8_part)]
            parts = packed.setdefault(prefix, {})
            parts[int8_part] = tensor
            if len(parts) < len(INT8_PARTS):
                continue
            del packed[prefix]
            weight = quant.Int8Weight(name=prefix + "weight", source="rtn", out_features=parts["weight_int8"].shape[0],
                                      in_features=parts["weight_int8"].shape[1],
                                      group_size=parts["weight_int8"].shape[1] // parts["weight_scale"].shape[1],
                                      scales=parts["weight_scale"].contiguous(), q=parts["weight_int8"].contiguous())
            name, tensor = prefix + "weight", weight if keep else weight.dequantize().to(device=device, dtype=dtype)
            del parts, weight
        if isinstance(tensor, quant.QuantizedWeight):
            check_finite_container(reader.where(name), name, tensor)
        else:
            check_finite(reader.where(name), name, tensor)
        weights[name] = tensor
        fuse_parts(weights, name, dtype, device, decoded)  # the parts' pages leave the process with them
        del tensor
    return weights


def _gptq_linear(reader: CheckpointReader, prefix: str, parts: dict[str, torch.Tensor], config: MiniCPMConfig,
                 dtype: torch.dtype, device: torch.device, keep: bool):
    groups = parts["scales"].shape[0]
    g_idx = parts["g_idx"]
    if g_idx.numel() and not (0 <= int(g_idx.min()) and int(g_idx.max()) < groups):
        raise CheckpointError(f"{reader.location[prefix + 'g_idx'].path}: tensor '{prefix}g_idx' holds "
                              f"groups outside [0, {groups})")
    group_size = g_idx.numel() // groups
    if keep and gptq.plain_groups(g_idx, group_size):
        return gptq.container(prefix + "weight", parts["qweight"], parts["qzeros"], parts["scales"], group_size,
                              config.gptq.zero_offset)
    weight = gptq.dequantize(parts["qweight"], parts["qzeros"], parts["scales"], g_idx, config.gptq.zero_offset)
    return weight.to(device=device, dtype=dtype)


def check_finite_container(path: Path, name: str, weight: quant.QuantizedWeight) -> None:
    """:func:`check_finite` on a container's float fields (scales, zeros, mins)."""
    for field, tensor in weight.tensors().items():
        try:
            check_finite(path, name, tensor)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} (in its {field})") from None


def fuse_parts(weights: dict[str, torch.Tensor], name: str, dtype: torch.dtype | None = None,
               device: torch.device | None = None, decoded: DecodedAtLoad | None = None) -> tuple[str, ...]:
    """When ``name`` (just added to ``weights``) completes a :data:`FUSED` group, replace the
    group's parts by their concatenation. Returns the names of the parts fused (empty if none).

    Quantized parts (``hal.quant`` containers) of one kind, source and group size fuse into one
    container (``hal.quant.cat_rows``); a group mixing kinds or with dense parts is decoded into
    dense ``dtype`` on ``device`` and fused dense, and ``decoded`` (when given) names it, and why
    (a part's own entry there, decoded before the fusion, moves to the fused name)."""
    for fused, parts_of in FUSED.items():
        prefix = name[: -len(parts_of[-1])]
        if name.endswith(parts_of[-1]) and all(prefix + p in weights for p in parts_of):
            parts = [weights.pop(prefix + p) for p in parts_of]
            weights[prefix + fused] = _fuse(prefix + fused, parts, dtype, device)
            if decoded is not None:
                reasons = [decoded.pop(prefix + p) for p in parts_of if prefix + p in decoded]
                kinds = sorted({p.format if isinstance(p, quant.QuantizedWeight) else "dense" for p in parts})
                if isinstance(weights[prefix + fused], torch.Tensor) and (reasons or len(kinds) > 1):
                    decoded[prefix + fused] = reasons[0] if reasons else f"its parts mix {' and '.join(kinds)}"
            return tuple(prefix + p for p in parts_of)
    return ()


def _fuse(name: str, parts: list, dtype: torch.dtype | None, device: torch.device | None):
    containers = [p for p in parts if isinstance(p, quant.QuantizedWeight)]
    if not containers:
        return torch.cat(parts)
    first = containers[0]
    if len(containers) == len(parts) and all(quant.fusable(first, p) for p in parts):
        return quant.cat_rows(name, parts)
    return torch.cat([p.dequantize().to(device=device, dtype=dtype) if isinstance(p, quant.QuantizedWeight)
                      else p for p in parts])
