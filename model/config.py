"""MiniCPM config.json parsing. Every field the model reads is validated here, with an error
that names the file and the field; defaults are those of the remote ``MiniCPMConfig``."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hal.errors import ConfigError
from hal.sparse import InfLLMGeometry

SUPPORTED_ARCHITECTURES = ("MiniCPMForCausalLM", "MiniCPMSALAForCausalLM")
MODEL_TYPES = ("minicpm", "minicpm_sala")
LIGHTNING_MIXERS = ("lightning", "lightning_attn", "lightning-attn")  # the names SALA's remote code accepts
LIGHTNING_SCALES = {"1/sqrt(d)": lambda d: d ** -0.5, "1/d": lambda d: 1.0 / d}


@dataclass(frozen=True)
class RopeScaling:
    """LongRoPE parameters (``rope_scaling`` with ``rope_type: longrope``)."""

    long_factor: tuple[float, ...]
    short_factor: tuple[float, ...]
    original_max_position_embeddings: int


@dataclass(frozen=True)
class SparseAttention:
    """InfLLM-v2 (``sparse_config``): attention is sparse once a forward's longest row reaches
    ``dense_len`` tokens (-1: always), with the block selection of ``geometry``. The switch is
    per forward, for the whole batch (the v2 code's ``position_ids.max() + 1``): a shorter row in
    the same batch is attended sparsely too, which equals dense while its blocks fit the budget. The v2 rules
    (MiniCPM4.1 code, current kernels): coarse kernels of 4x the size and stride for the softmax
    normaliser, and a budget of ``topk + window_size / block_size`` blocks per query."""

    geometry: InfLLMGeometry
    dense_len: int

    def applies(self, longest: int) -> bool:
        return self.dense_len < 0 or longest >= self.dense_len


@dataclass(frozen=True)
class LightningLayers:
    """MiniCPM-SALA's linear-attention ("lightning") layers (research/sala_spec.md §5): heads (no
    GQA) of the model's head_dim, q scaled by ``scale``; per-head RMSNorm on q and k
    (``qk_norm``), RoPE (``use_rope``), RMSNorm over all heads' outputs (``output_norm``) and a
    sigmoid output gate ``z_proj`` (``output_gate``)."""

    heads: int
    scale: float
    use_rope: bool = True
    qk_norm: bool = True
    output_norm: bool = True
    output_gate: bool = True


@dataclass(frozen=True)
class GPTQ:
    """``quantization_config`` of a GPTQ int4 checkpoint (``model/gptq.py``): the decoder layers'
    linear weights are stored packed; ``zero_offset`` 1 for checkpoint_format "gptq", 0 for "gptq_v2"."""

    group_size: int
    zero_offset: int


@dataclass(frozen=True)
class Int8Linears:
    """``quantization_config`` ``{"quant_method": "hal_int8", "bits": 8, "group_size": N}`` (written
    by ``python -m model.quantize --format int8``): each decoder linear is stored as
    ``<linear>.weight_int8`` int8 `[O, K]` and ``<linear>.weight_scale`` float32 `[O, K / N]`
    (``w = scale * q``); ``group_size`` -1: one scale per output channel."""

    group_size: int


INT8_METHOD = "hal_int8"


@dataclass(frozen=True)
class MiniCPMConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    scale_emb: float = 1.0
    scale_depth: float = 1.0
    dim_model_base: float = 1.0
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    sparse: SparseAttention | None = None
    mixers: tuple[str, ...] = ()
    attn_use_rope: bool = True
    attn_output_gate: bool = False
    lightning: LightningLayers | None = None
    gptq: GPTQ | None = None
    int8: Int8Linears | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def mixer(self, layer: int) -> str:
        """``attention`` (softmax, dense or InfLLM-v2) or ``lightning`` (SALA's linear layers)."""
        return self.mixers[layer] if self.mixers else "attention"

    @property
    def residual_scale(self) -> float:
        """μP: each residual branch is multiplied by scale_depth / sqrt(L)."""
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_scale(self) -> float:
        """μP: the final hidden state is divided by hidden_size / dim_model_base before lm_head."""
        return self.hidden_size / self.dim_model_base

    def shapes(self) -> dict[str, int]:
        """Sizes for the op registry's ``supports()`` checks."""
        return {
            "E": self.hidden_size,
            "F": self.intermediate_size,
            "V": self.vocab_size,
            "H": self.num_attention_heads,
            "Hk": self.num_key_value_heads,
            "D": self.head_dim,
        }


class _Fields:
    """Typed access to a config dict; every error names the file and the field."""

    def __init__(self, data: dict[str, Any], source: str, prefix: str = ""):
        self.data = data
        self.source = source
        self.prefix = prefix  # "sparse_config." for the fields of a nested object

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: field '{self.prefix}{name}' {problem}")

    def integer(self, name: str, default: Any = ..., minimum: int | None = 1) -> Any:
        if name not in self.data or self.data[name] is None:
            if default is ...:
                raise self.fail(name, "is required but missing")
            return default
        value = self.data[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(name, f"must be >= {minimum}, got {value}")
        return value

    def number(self, name: str, default: Any = ..., positive: bool = True) -> Any:
        if name not in self.data or self.data[name] is None:
            if default is ...:
                raise self.fail(name, "is required but missing")
            return default
        value = self.data[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(name, f"must be a number, got {value!r}")
        if positive and value <= 0:
            raise self.fail(name, f"must be > 0, got {value}")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, got {value!r}")
        return value

    def token_ids(self, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
        value = self.data.get(name)
        if value is None:
            return default
        items = value if isinstance(value, list) else [value]
        if not items or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
            raise self.fail(name, f"must be a token id or a list of token ids, got {value!r}")
        return tuple(items)


def _factor_list(fields: _Fields, scaling: dict[str, Any], key: str, length: int) -> tuple[float, ...]:
    value = scaling.get(key)
    name = f"rope_scaling.{key}"
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                          for v in value):
        raise fields.fail(name, f"must be a list of {length} numbers, got {value!r}"[:200])
    if len(value) != length:
        raise fields.fail(name, f"must have head_dim/2 = {length} entries, got {len(value)}")
    if any(not math.isfinite(v) or v <= 0 for v in value):
        raise fields.fail(name, "must hold positive finite numbers")
    return tuple(float(v) for v in value)


def _rope_scaling(fields: _Fields, head_dim: int) -> RopeScaling | None:
    scaling = fields.data.get("rope_scaling")
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise fields.fail("rope_scaling", f"must be an object or null, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "longrope":
        raise fields.fail("rope_scaling.rope_type",
                          f"must be 'longrope' (the only MiniCPM4 scaling), got {kind!r}")
    original = scaling.get("original_max_position_embeddings")
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise fields.fail("rope_scaling.original_max_position_embeddings",
                          f"must be a positive integer, got {original!r}")
    return RopeScaling(
        long_factor=_factor_list(fields, scaling, "long_factor", head_dim // 2),
        short_factor=_factor_list(fields, scaling, "short_factor", head_dim // 2),
        original_max_position_embeddings=original,
    )


def _sparse_attention(fields: _Fields) -> SparseAttention | None:
    data = fields.data.get("sparse_config")
    if data is None:
        return None
    if not isinstance(data, dict):
        raise fields.fail("sparse_config", f"must be an object or null, got {data!r}")
    sub = _Fields(data, fields.source, prefix="sparse_config.")
    size, stride = sub.integer("kernel_size", 32), sub.integer("kernel_stride", 16)
    block, window = sub.integer("block_size", 64), sub.integer("window_size", 2048)
    init, topk = sub.integer("init_blocks", 1, minimum=0), sub.integer("topk", 64)
    dense_len = sub.integer("dense_len", 8192, minimum=-1)
    if sub.boolean("use_nope", False):
        raise sub.fail("use_nope", "true is not supported (it scores blocks with pre-RoPE keys, a second cache)")
    if size % stride:
        raise sub.fail("kernel_size", f"must be a multiple of kernel_stride={stride}, got {size}")
    if block % stride:
        raise sub.fail("block_size", f"must be a multiple of kernel_stride={stride}, got {block}")
    if window % block:
        raise sub.fail("window_size", f"must be a multiple of block_size={block}, got {window}")
    if topk < init + 1:
        raise sub.fail("topk", f"must be > init_blocks={init} (the forced blocks must fit the budget), got {topk}")
    local = window // block
    geometry = InfLLMGeometry(kernel_size=size, kernel_stride=stride, coarse_size=4 * size, coarse_stride=4 * stride,
                              block_size=block, init_blocks=init, local_blocks=local, budget=topk + local)
    return SparseAttention(geometry, dense_len)


def _mixers(fields: _Fields, layers: int) -> tuple[str, ...]:
    value = fields.data.get("mixer_types")
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) != layers:
        raise fields.fail("mixer_types", f"must be a list of num_hidden_layers={layers} names, got {value!r}"[:200])
    mixers = []
    for i, name in enumerate(value):
        if name == "minicpm4":
            mixers.append("attention")
        elif name in LIGHTNING_MIXERS:
            mixers.append("lightning")
        else:
            raise fields.fail("mixer_types", f"entry {i} must be 'minicpm4' or 'lightning-attn', got {name!r}")
    return tuple(mixers)


def _lightning(fields: _Fields, heads: int, head_dim: int) -> LightningLayers:
    nh = fields.integer("lightning_nh", heads)
    if nh != heads:
        raise fields.fail("lightning_nh", f"must equal num_attention_heads={heads}, got {nh}")
    nkv = fields.integer("lightning_nkv", nh)
    if nkv != nh:
        raise fields.fail("lightning_nkv", f"must equal lightning_nh={nh} (lightning layers have no GQA), got {nkv}")
    dim = fields.integer("lightning_head_dim", head_dim)
    if dim != head_dim:
        raise fields.fail("lightning_head_dim", f"must equal the head_dim {head_dim}, got {dim}")
    scale = fields.data.get("lightning_scale", "1/sqrt(d)")
    if scale not in LIGHTNING_SCALES:
        raise fields.fail("lightning_scale", f"must be one of {', '.join(LIGHTNING_SCALES)}, got {scale!r}")
    if fields.boolean("lightning_layerwise_decay", False):
        raise fields.fail("lightning_layerwise_decay", "true (MiniMax's per-layer decay scaling) is not supported")
    return LightningLayers(heads=nh, scale=LIGHTNING_SCALES[scale](dim),
                           use_rope=fields.boolean("lightning_use_rope", True), qk_norm=fields.boolean("qk_norm", True),
                           output_norm=fields.boolean("use_output_norm", True),
                           output_gate=fields.boolean("use_output_gate", True))


def _gptq(fields: _Fields, inputs: tuple[int, ...], outputs: tuple[int, ...], sala: bool) -> GPTQ | None:
    """inputs / outputs: the decoder linears' input (K) and output (N) sizes."""
    data = fields.data.get("quantization_config")
    if data is None:
        return None
    if not isinstance(data, dict):
        raise fields.fail("quantization_config", f"must be an object or null, got {data!r}"[:200])
    q = _Fields(data, fields.source, prefix="quantization_config.")
    method = data.get("quant_method", "gptq")
    if method == INT8_METHOD:
        return None
    if method != "gptq":
        raise q.fail("quant_method", f"must be 'gptq' or '{INT8_METHOD}' (the quantized formats supported), "
                                     f"got {method!r}")
    if q.integer("bits") != 4:
        raise q.fail("bits", f"must be 4, got {data['bits']!r}")
    if q.boolean("lm_head", False):
        raise q.fail("lm_head", "true (a quantized lm_head) is not supported")
    if sala:
        raise q.fail("quant_method", "GPTQ MiniCPM-SALA checkpoints are not supported (which SALA projections "
                                     "stay unquantized is unverified)")
    form = data.get("checkpoint_format", "gptq")
    if form not in ("gptq", "gptq_v2"):
        raise q.fail("checkpoint_format", f"must be 'gptq' or 'gptq_v2', got {form!r}")
    group = q.integer("group_size", 128, minimum=-1)
    if group == 0:
        raise q.fail("group_size", "must be -1 (one group per column) or > 0, got 0")
    for size in inputs:
        if size % 8 or (group > 0 and size % group):
            raise q.fail("group_size", f"{group} (and 8) must divide every linear's input size, got {size}")
    for size in outputs:
        if size % 8:
            raise q.fail("bits", f"4-bit packing needs output sizes divisible by 8, got {size}")
    return GPTQ(group_size=group, zero_offset=1 if form == "gptq" else 0)


def _int8(fields: _Fields, inputs: tuple[int, ...]) -> Int8Linears | None:
    data = fields.data.get("quantization_config")
    if not isinstance(data, dict) or data.get("quant_method") != INT8_METHOD:
        return None
    q = _Fields(data, fields.source, prefix="quantization_config.")
    if q.integer("bits") != 8:
        raise q.fail("bits", f"must be 8 for {INT8_METHOD}, got {data['bits']!r}")
    group = q.integer("group_size", -1, minimum=-1)
    if group == 0:
        raise q.fail("group_size", "must be -1 (one scale per output channel) or > 0, got 0")
    for size in inputs:
        if group > 0 and size % group:
            raise q.fail("group_size", f"{group} must divide every linear's input size, got {size}")
    return Int8Linears(group_size=group)


def parse_config(data: Any, source: str = "config.json") -> MiniCPMConfig:
    """Validate a config dict and build :class:`MiniCPMConfig`. Raises :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must hold a JSON object, got {type(data).__name__}")
    f = _Fields(data, source)
    architectures = data.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        raise f.fail("architectures", f"must be a non-empty list, got {architectures!r}")
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise f.fail("architectures", f"names unsupported architecture {architectures!r}; "
                                      f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    model_type = data.get("model_type", "minicpm")
    if model_type not in MODEL_TYPES:
        raise f.fail("model_type", f"must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    hidden_act = data.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise f.fail("hidden_act", f"must be 'silu', got {hidden_act!r}")
    if f.boolean("attention_bias", False):
        raise f.fail("attention_bias", "must be false: MiniCPM attention has no bias")

    hidden = f.integer("hidden_size")
    heads = f.integer("num_attention_heads")
    kv_heads = f.integer("num_key_value_heads", heads)
    if hidden % heads:
        raise f.fail("hidden_size", f"must be divisible by num_attention_heads={heads}, got {hidden}")
    if heads % kv_heads:
        raise f.fail("num_key_value_heads", f"must divide num_attention_heads={heads}, got {kv_heads}")
    head_dim = hidden // heads
    if head_dim % 2:
        raise f.fail("hidden_size", f"gives an odd head_dim {head_dim}; rotary needs an even one")
    if "head_dim" in data and data["head_dim"] not in (None, head_dim):
        raise f.fail("head_dim",
                     f"must equal hidden_size/num_attention_heads = {head_dim}, got {data['head_dim']!r}")

    mixers = _mixers(f, f.integer("num_hidden_layers"))
    dtype = data.get("torch_dtype", data.get("dtype", "float32"))
    if dtype not in ("float32", "bfloat16", "float16"):
        raise f.fail("torch_dtype", f"must be float32, bfloat16 or float16, got {dtype!r}")

    config = MiniCPMConfig(
        vocab_size=f.integer("vocab_size"),
        hidden_size=hidden,
        intermediate_size=f.integer("intermediate_size"),
        num_hidden_layers=f.integer("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=f.integer("max_position_embeddings"),
        rms_norm_eps=f.number("rms_norm_eps", 1e-6),
        rope_theta=f.number("rope_theta", 10000.0),
        rope_scaling=_rope_scaling(f, head_dim),
        scale_emb=f.number("scale_emb", 1.0),
        scale_depth=f.number("scale_depth", 1.0),
        dim_model_base=f.number("dim_model_base", 1.0),
        tie_word_embeddings=f.boolean("tie_word_embeddings", True),
        bos_token_id=f.integer("bos_token_id", None, minimum=0),
        eos_token_ids=f.token_ids("eos_token_id", (2,)),
        pad_token_id=f.integer("pad_token_id", None, minimum=0),
        torch_dtype=dtype,
        sparse=_sparse_attention(f),
        mixers=mixers,
        attn_use_rope=f.boolean("attn_use_rope", True),
        attn_output_gate=f.boolean("attn_use_output_gate", False),
        lightning=_lightning(f, heads, head_dim) if "lightning" in mixers else None,
        gptq=_gptq(f, (hidden, f.integer("intermediate_size"), heads * head_dim),
                   (hidden, f.integer("intermediate_size"), kv_heads * head_dim),
                   sala="lightning" in mixers or f.boolean("attn_use_output_gate", False)),
        int8=_int8(f, (hidden, f.integer("intermediate_size"), heads * head_dim)),
        raw=data,
    )
    for name in ("bos_token_id", "pad_token_id"):
        value = getattr(config, name)
        if value is not None and value >= config.vocab_size:
            raise f.fail(name, f"must be < vocab_size={config.vocab_size}, got {value}")
    if any(i >= config.vocab_size for i in config.eos_token_ids):
        raise f.fail("eos_token_id",
                     f"must be < vocab_size={config.vocab_size}, got {list(config.eos_token_ids)}")
    return config


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file, turning every failure into a one-line :class:`ConfigError`."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: "
                          f"{exc.msg}") from None


def load_config(checkpoint: Path) -> MiniCPMConfig:
    path = Path(checkpoint) / "config.json"
    return parse_config(read_json(path, "config.json"), source=str(path))


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults from generation_config.json (greedy when absent)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()


def load_generation_config(checkpoint: Path, vocab_size: int | None = None) -> GenerationDefaults:
    """generation_config.json's sampling defaults, every field checked (the file is named in
    errors); ``vocab_size``: eos ids must lie below it."""
    path = Path(checkpoint) / "generation_config.json"
    if not path.exists():
        return GenerationDefaults()
    data = read_json(path, "generation_config.json")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    f = _Fields(data, str(path))
    top_p = f.number("top_p", 1.0)
    if top_p > 1.0:
        raise f.fail("top_p", f"must be in (0, 1], got {top_p}")
    temperature = f.number("temperature", 1.0, positive=False)
    if temperature < 0:
        raise f.fail("temperature", f"must be >= 0, got {temperature}")
    eos = f.token_ids("eos_token_id", ())
    if vocab_size is not None and any(i >= vocab_size for i in eos):
        raise f.fail("eos_token_id", f"must be < vocab_size={vocab_size} (config.json), got {list(eos)}")
    return GenerationDefaults(
        do_sample=f.boolean("do_sample", False),
        temperature=temperature,
        top_k=f.integer("top_k", 0, minimum=0),
        top_p=top_p,
        eos_token_ids=eos,
    )
