"""GGUF checkpoints (llama.cpp's format) as a :class:`MiniCPMConfig` and the same weights mapping
the safetensors path builds, so the model core, the shape checks and the config validation are
shared (``model/config.py``, ``model/checkpoint.py``).

Architectures (``general.architecture``):

``minicpm``  what llama.cpp's ``convert_hf_to_gguf.py`` (class ``MiniCPMModel``) writes:
             ``minicpm.embedding_scale = scale_emb``, ``minicpm.residual_scale = scale_depth/√L``,
             ``minicpm.logit_scale = hidden_size/dim_model_base``; LongRoPE as the tensors
             ``rope_factors_long.weight`` / ``rope_factors_short.weight`` `[D/2]` (F32) with
             ``minicpm.rope.scaling.type = longrope``; q_proj / k_proj rows permuted.
``llama``    a Llama is a MiniCPM with neutral μP: scale_emb 1, scale_depth √L (residual scale 1),
             dim_model_base = hidden_size (logit scale 1).

Mapped back exactly: scale_emb = embedding_scale, scale_depth = residual_scale·√L,
dim_model_base = hidden_size / logit_scale. The converter writes no
``rope.scaling.original_context_length`` for MiniCPM; llama.cpp then takes the training context
(``context_length``) as the original length, and so does this loader (short factors, mscale 1:
exact for the shipped MiniCPM4 configs, whose max_position_embeddings equals the original). A file
that carries the key gets it honoured.

Q/K rows: llama.cpp's rotary pairs adjacent elements, HF's pairs ``j`` with ``j + D/2``; the
converter (``LlamaModel.permute``) stores each head's rows reordered as
``w.reshape(n, 2, D/2, E).swapaxes(1, 2)``. :func:`unpermute_rows` is its inverse.

Kept quantized (``keep=True``, the default of ``hal.load_model`` for a GGUF): the decoder layers'
linears of types Q4_0 / Q4_1 / Q8_0 become ``hal.quant`` containers (``model/gguf_quant.py``), their
rows unpermuted alike (a row permutation moves each row's blocks with it). So does the token
embedding of those types (``token_embd.weight``, usually Q8_0; with tied embeddings also the
lm_head): the model holds its codes (``model/table.py``). The norms and an untied lm_head stay dense
(dequantized into the model dtype), as do tensors of other types.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from hal.errors import CheckpointError, ConfigError
from hal import quant
from model.checkpoint import QUANTIZED, DecodedAtLoad, expected_shapes, fuse_parts
from model.config import MiniCPMConfig, parse_config
from model.gguf_file import GGUFFile
from model.sharding import ShardPlan

ARCHITECTURES = ("llama", "minicpm")
ROPE_FACTORS = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}
"""rope_scaling field -> GGUF tensor (``gguf.MODEL_TENSOR.ROPE_FACTORS_LONG`` / ``_SHORT``)."""


def _keys():
    import gguf

    return gguf.Keys


def config_dict(file: GGUFFile) -> dict[str, Any]:
    """The GGUF metadata as a ``config.json`` dict (our Hugging Face layout). Raises
    :class:`CheckpointError` naming the key for an unsupported architecture, a missing key or a
    value the model core cannot run (partial rotary, unknown RoPE scaling)."""
    keys = _keys()
    arch = file.architecture
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{file.path}: unsupported GGUF architecture '{arch}' (general.architecture); "
                              f"supported: {', '.join(ARCHITECTURES)}")
    k = file.key
    layers = file.integer(k(keys.LLM.BLOCK_COUNT))
    hidden = file.integer(k(keys.LLM.EMBEDDING_LENGTH))
    heads = file.integer(k(keys.Attention.HEAD_COUNT))
    kv_heads = file.integer(k(keys.Attention.HEAD_COUNT_KV), heads)
    head_dim = hidden // heads if heads else 0
    for template in (keys.Attention.KEY_LENGTH, keys.Attention.VALUE_LENGTH, keys.Rope.DIMENSION_COUNT):
        value = file.integer(k(template), head_dim)
        if value != head_dim:
            raise CheckpointError(f"{file.path}: GGUF key '{k(template)}' is {value}, but the model core needs "
                                  f"hidden_size/head_count = {head_dim} (partial rotary or other head sizes "
                                  "are not supported)")
    tokens = file.strings(keys.Tokenizer.LIST, None)
    vocab = file.integer(k(keys.LLM.VOCAB_SIZE), None)
    if vocab is None:
        if tokens is None:
            raise CheckpointError(f"{file.path}: missing GGUF metadata key '{k(keys.LLM.VOCAB_SIZE)}' "
                                  f"(and no '{keys.Tokenizer.LIST}' to count)")
        vocab = len(tokens)
    context = file.integer(k(keys.LLM.CONTEXT_LENGTH))

    data: dict[str, Any] = {
        "architectures": ["MiniCPMForCausalLM"],
        "model_type": "minicpm",
        "hidden_act": "silu",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": file.integer(k(keys.LLM.FEED_FORWARD_LENGTH)),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": context,
        "rms_norm_eps": file.number(k(keys.Attention.LAYERNORM_RMS_EPS)),
        "rope_theta": file.number(k(keys.Rope.FREQ_BASE), 10000.0),
        "tie_word_embeddings": "output.weight" not in file.tensors,
        "torch_dtype": "float32" if all(file.type_name(n) == "F32" for n in file.tensors) else "bfloat16",
    }
    if arch == "minicpm":
        data["scale_emb"] = file.number(k(keys.LLM.EMBEDDING_SCALE))
        data["scale_depth"] = file.number(k(keys.LLM.RESIDUAL_SCALE)) * math.sqrt(layers)
        logit_scale = file.number(k(keys.LLM.LOGIT_SCALE))
        if logit_scale <= 0:
            raise CheckpointError(f"{file.path}: GGUF key '{k(keys.LLM.LOGIT_SCALE)}' must be > 0, "
                                  f"got {logit_scale}")
        data["dim_model_base"] = hidden / logit_scale
    else:
        data.update(scale_emb=1.0, scale_depth=math.sqrt(layers), dim_model_base=float(hidden))
    data["rope_scaling"] = _rope_scaling(file, context)
    data.update(_special_ids(file))
    return data


def _rope_scaling(file: GGUFFile, context: int) -> dict[str, Any] | None:
    keys = _keys()
    key = file.key(keys.Rope.SCALING_TYPE)
    kind = file.string(key, "none")
    present = [n for n in ROPE_FACTORS.values() if n in file.tensors]
    if kind == "none" and not present:
        return None
    if kind not in ("none", "longrope"):
        raise CheckpointError(f"{file.path}: GGUF key '{key}' is '{kind}'; supported: none, longrope")
    if file.architecture != "minicpm":
        raise CheckpointError(f"{file.path}: LongRoPE ('{key}' / rope_factors tensors) is only supported for "
                              f"architecture minicpm, not '{file.architecture}'")
    missing = [n for n in ROPE_FACTORS.values() if n not in file.tensors]
    if missing:
        raise CheckpointError(f"{file.path}: LongRoPE needs tensor '{missing[0]}', which is missing")
    scaling: dict[str, Any] = {"rope_type": "longrope",
                               "original_max_position_embeddings":
                                   file.integer(file.key(keys.Rope.SCALING_ORIG_CTX_LEN), context)}
    for field, name in ROPE_FACTORS.items():
        scaling[field] = [float(v) for v in file.tensor(name, torch.float32).reshape(-1).tolist()]
    return scaling


def _special_ids(file: GGUFFile) -> dict[str, Any]:
    """bos / eos / pad ids for config.json; llama.cpp's end-of-turn id joins the eos list."""
    keys = _keys()
    bos = file.integer(keys.Tokenizer.BOS_ID, None)
    eos = file.integer(keys.Tokenizer.EOS_ID, None)
    eot = file.integer(keys.Tokenizer.EOT_ID, None)
    eos_ids = [i for i in dict.fromkeys((eos, eot)) if i is not None]
    return {"bos_token_id": bos, "eos_token_id": eos_ids or None,
            "pad_token_id": file.integer(keys.Tokenizer.PAD_ID, None)}


def load_gguf_config(file: GGUFFile) -> MiniCPMConfig:
    """:func:`config_dict` validated by ``model.config.parse_config`` (ConfigError -> CheckpointError)."""
    try:
        return parse_config(config_dict(file), source=f"{file.path} (GGUF metadata)")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def tensor_names(config: MiniCPMConfig, architecture: str) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name, from gguf-py's own ``TensorNameMap``."""
    import gguf

    arch = gguf.MODEL_ARCH.MINICPM if architecture == "minicpm" else gguf.MODEL_ARCH.LLAMA
    mapping = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    names = {}
    for hf_name in expected_shapes(config):
        gguf_name = mapping.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:  # pragma: no cover - every MiniCPM/Llama tensor has a GGUF name
            raise CheckpointError(f"no GGUF name for tensor '{hf_name}'")
        names[hf_name] = gguf_name
    return names


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF -> llama.cpp row order of q_proj / k_proj `[heads*D, E]` (``LlamaModel.permute``)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp -> HF row order of q_proj / k_proj `[heads*D, E]`: the inverse of :func:`permute_rows`."""
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _check_tensors(file: GGUFFile, config: MiniCPMConfig, names: dict[str, str]) -> None:
    expected = expected_shapes(config)
    known = set(names.values()) | set(ROPE_FACTORS.values() if config.rope_scaling else ())
    for hf_name, gguf_name in names.items():
        if gguf_name not in file.tensors:
            raise CheckpointError(f"{file.path}: missing tensor '{gguf_name}' ({hf_name}, expected "
                                  f"{list(expected[hf_name])})")
        if file.shape(gguf_name) != expected[hf_name]:
            raise CheckpointError(f"{file.path}: tensor '{gguf_name}' has shape {list(file.shape(gguf_name))}, "
                                  f"expected {list(expected[hf_name])} from the GGUF metadata")
    extra = sorted(set(file.tensors) - known)
    if extra:
        raise CheckpointError(f"{file.path}: unexpected tensor '{extra[0]}'"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


EMBEDDING = "model.embed_tokens.weight"
UNQUANTIZED = ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")
"""GGUF types that are plain numbers: a tensor stored so is not named as decoded at load."""


def kept_quantized(file: GGUFFile, hf_name: str, gguf_name: str) -> bool:
    """True when ``hf_name`` is a decoder-layer linear or the token embedding stored in a type kept
    quantized."""
    from model.gguf_quant import KEPT

    return (hf_name == EMBEDDING or _is_linear(hf_name)) and file.type_name(gguf_name) in KEPT


def _is_linear(hf_name: str) -> bool:
    return hf_name.startswith("model.layers.") and hf_name.removesuffix(".weight").endswith(QUANTIZED)


def _quantized_tensor(file: GGUFFile, gguf_name: str) -> quant.QuantizedWeight:
    from model.gguf_quant import container

    info = file.tensors[gguf_name]
    if info.data.nbytes != info.n_bytes:
        raise CheckpointError(f"{file.path}: tensor '{gguf_name}' is truncated ({info.data.nbytes} of "
                              f"{info.n_bytes} bytes present)")
    shape = file.shape(gguf_name)
    weight = container(file.path, gguf_name, file.type_name(gguf_name), info.data.reshape(shape[0], -1), shape)
    file.release(gguf_name)
    return weight


def iter_hf_tensors(file: GGUFFile, config: MiniCPMConfig, dtype: torch.dtype, keep: bool = False,
                    shard: ShardPlan | None = None, decoded: DecodedAtLoad | None = None):
    """Yields (HF name, tensor in ``dtype`` on the CPU, HF row order), one tensor at a time;
    ``keep``: Q4_0 / Q4_1 / Q8_0 decoder linears and token embedding as ``hal.quant`` containers instead.
    shard: only this tensor-parallel rank's slice of each (dense) tensor (``model/sharding.py``;
    ``keep`` does not apply then); the q/k row permutation stays inside each head, so a slice of
    whole heads unpermutes alone. ``decoded`` (filled when given, with ``keep`` and no shard): the
    decoder linears, token embedding and lm_head stored quantized in a type decoded at load, and that type."""
    from model.gguf_quant import KEPT

    names = tensor_names(config, file.architecture)
    _check_tensors(file, config, names)
    for hf_name, gguf_name in names.items():
        if keep and shard is None and kept_quantized(file, hf_name, gguf_name):
            tensor = _quantized_tensor(file, gguf_name)
        else:
            kind = file.type_name(gguf_name)
            if keep and shard is None and decoded is not None and kind not in UNQUANTIZED \
                    and (_is_linear(hf_name) or hf_name in (EMBEDDING, "lm_head.weight")):
                decoded[hf_name] = f"GGUF {kind} is decoded at load (kept quantized: {', '.join(sorted(KEPT))})"
            # the permutation is undone in float32 when the tensor is read as float32 anyway
            tensor = file.tensor(gguf_name, dtype, shard.part(hf_name) if shard is not None else None)
        heads = (config.num_attention_heads if hf_name.endswith("self_attn.q_proj.weight") else
                 config.num_key_value_heads if hf_name.endswith("self_attn.k_proj.weight") else None)
        if heads is not None and isinstance(tensor, quant.QuantizedWeight):
            tensor = tensor.map_rows(lambda t: unpermute_rows(t, heads))
        elif heads is not None:  # a rank's slice holds fewer, whole heads
            tensor = unpermute_rows(tensor, tensor.shape[0] // config.head_dim).contiguous()
        yield hf_name, tensor


def load_gguf_weights(file: GGUFFile, config: MiniCPMConfig, dtype: torch.dtype,
                      device: torch.device, keep: bool = False,
                      shard: ShardPlan | None = None, decoded: DecodedAtLoad | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF dequantized into ``dtype`` on ``device``, under the HF names, with
    each layer's projections fused as ``model.checkpoint.FUSED`` says: what
    ``model.checkpoint.load_weights`` returns for the same model in safetensors. ``keep``: the
    Q4_0 / Q4_1 / Q8_0 decoder linears and token embedding stay ``hal.quant`` containers (on the CPU);
    ``decoded``: ``model.checkpoint.DecodedAtLoad``, filled."""
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in iter_hf_tensors(file, config, dtype, keep, shard, decoded):
        weights[name] = tensor if isinstance(tensor, quant.QuantizedWeight) else tensor.to(device)
        fuse_parts(weights, name, dtype, device, decoded)
    return weights


@dataclass(frozen=True)
class OpenedGGUF:
    """A parsed GGUF file with what every load of it needs: ``file`` (the tensor table and the
    memory map; the vocabulary arrays already dropped), its validated ``config``, and
    ``tokenizer_loader`` (the tokenizer built once, while the vocabulary was parsed; a tokenizer
    error is raised on first use, so a model whose tokenizer is unsupported still gives logits)."""

    file: GGUFFile
    config: MiniCPMConfig
    tokenizer_loader: Callable[[], Any]


_SHARED: ContextVar[dict[tuple[Any, ...], OpenedGGUF] | None] = ContextVar("gguf_shared", default=None)


@contextmanager
def parsed_once(store: dict[tuple[Any, ...], OpenedGGUF] | None = None) -> Iterator[None]:
    """Inside this scope :func:`open_checkpoint` parses each GGUF file once and every load of it
    shares the result (``validation.compare`` loads one file up to four times: its config, the
    reference, the device, a floor; parsing a 49k-token vocabulary takes seconds each time).
    ``store``: where the parsed files are kept (a caller's dict outlives the scope, e.g. a
    calibration's ``reuse``); default: a dict dropped, with its memory maps, when the scope ends.
    A scope inside another one uses the outer store. A file rewritten in the scope (other size,
    mtime or inode) is parsed again."""
    if _SHARED.get() is not None:
        yield
        return
    token = _SHARED.set({} if store is None else store)
    try:
        yield
    finally:
        _SHARED.reset(token)


def parsing_shared() -> bool:
    """True inside a :func:`parsed_once` scope."""
    return _SHARED.get() is not None


def _file_key(path: Path) -> tuple[Any, ...]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def open_checkpoint(path: str | Path) -> OpenedGGUF:
    """Parse the GGUF file ``path``: config, tokenizer, then the vocabulary arrays are dropped
    (they are not kept beside the weights). Inside :func:`parsed_once`, a file parsed before is
    returned as it was. Raises :class:`CheckpointError` for a file that cannot be read."""
    path = Path(path)
    shared = _SHARED.get()
    key = _file_key(path) if shared is not None and path.is_file() else None
    if key is not None and key in shared:
        return shared[key]
    file = GGUFFile(path)
    config = load_gguf_config(file)
    opened = OpenedGGUF(file, config, _tokenizer_loader(file))
    file.forget_vocabulary()
    if key is not None:
        shared[key] = opened
    return opened


def _tokenizer_loader(file: GGUFFile) -> Callable[[], Any]:
    from model.gguf_tokenizer import load_gguf_tokenizer

    try:
        tokenizer = load_gguf_tokenizer(file)
    except CheckpointError as exc:
        error = exc

        def fail():
            raise error

        return fail
    return lambda: tokenizer
