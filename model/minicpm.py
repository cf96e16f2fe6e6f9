"""The MiniCPM4 decoder (dense, and InfLLM-v2 sparse attention past ``dense_len``) and
MiniCPM-SALA (its layers mix InfLLM-v2 attention and lightning linear attention), written
against hal ops only.

Per layer (μP scalings, α = scale_depth / sqrt(L)):
    x  = h + α · Attn(RMSNorm_in(h));   h' = x + α · MLP(RMSNorm_post(x))
Embeddings are multiplied by scale_emb; the final normed hidden state is divided by
hidden_size / dim_model_base before lm_head; logits are float32.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from hal.errors import InputError
from hal.registry import BoundOps
from model.cache import KVCache
from model.config import GenerationDefaults, MiniCPMConfig
from model.rope import RopeTable
from model.slopes import alibi_slopes
from model.table import PreparedTable, prepare_embedding
from model.tp import TensorParallel
from model.tp import single as single_rank


@dataclass(frozen=True)
class PreparedLinear:
    """A quantized linear as the bound implementation of its op prepared it (``BoundOps.prepare``):
    ``weight`` is that implementation's own layout; ``format`` / ``nbytes`` describe the
    checkpoint's container (``hal.quant``), ``prepared_bytes`` what the model holds."""

    op: str
    impl: str
    weight: object
    format: str
    shape: tuple[int, int]
    nbytes: int
    prepared_bytes: int


def prepare_linear(ops: BoundOps, weight):
    """A dense `[O, K]` tensor -> what the bound ``linear`` prepares of it (``cpu.torch_kn``: the same
    values as the transposed view of a `[K, O]` contiguous copy; the tensor itself for the others); a
    ``hal.quant`` container -> :class:`PreparedLinear` (made once). A quantized op whose implementation
    decodes the container into a dense tensor (the ``dequant`` fallback) holds it in the dense layout
    too, so a quantized checkpoint served that way computes bitwise what its dense decoding does."""
    if weight is None:
        return None
    if isinstance(weight, torch.Tensor):
        return ops.prepare("linear", weight)
    prepared = ops.prepare(weight.op, weight)
    if isinstance(prepared, torch.Tensor):  # a dense decoding (cpu.dequant): laid out as the dense linears are
        prepared = ops.prepare("linear", prepared)
    # no nbytes of its own: the container itself (the reference) counts the container's bytes
    return PreparedLinear(weight.op, ops.record[weight.op].impl, prepared, weight.format, weight.shape, weight.nbytes,
                          _held_bytes(prepared, weight.nbytes))


def _held_bytes(prepared, default: int) -> int:
    """Bytes a prepared weight holds: its ``nbytes``, a tensor's storage, else ``default``."""
    size = getattr(prepared, "nbytes", None)
    if size is None:
        size = prepared.numel() * prepared.element_size() if isinstance(prepared, torch.Tensor) else default
    return int(size)


@dataclass(frozen=True)
class PreparedHead:
    """The lm_head as the bound ``logits`` implementation prepared it (``BoundOps.prepare``, e.g.
    ``cpu.fbgemm``'s packed float16 copy): ``weight`` is what that implementation receives,
    ``source`` the dense `[V, E]` tensor or the quantized table (``model/table.py``) it was made
    from (the model's own, not a copy: the embedding of a tied lm_head reads it), ``layout`` the
    prepared form's name and ``prepared_bytes`` what it holds in addition to ``source``."""

    impl: str
    source: torch.Tensor | PreparedTable
    weight: object
    layout: str
    prepared_bytes: int


def prepare_head(ops: BoundOps, lm_head: torch.Tensor | PreparedTable) -> PreparedHead | None:
    """The bound ``logits`` implementation's form of ``lm_head`` (made once), or None where it has
    no prepare (it then receives the dense tensor). A quantized table: the implementation's form
    of its container (the dense table, held here, where it has no prepare for one)."""
    if isinstance(lm_head, PreparedTable):
        prepared = lm_head.for_ops(ops, "logits")
        layout = getattr(prepared, "layout", "dense (decoded at load)")
        return PreparedHead(ops.record["logits"].impl, lm_head, prepared, layout, _held_bytes(prepared, 0))
    prepared = ops.prepare("logits", lm_head)
    if prepared is lm_head:
        return None
    return PreparedHead(ops.record["logits"].impl, lm_head, prepared, getattr(prepared, "layout", "dense"),
                        _held_bytes(prepared, 0))


def _linear(ops: BoundOps, x: torch.Tensor, weight) -> torch.Tensor:
    """x `[..., K]` @ a dense weight `[O, K]` (ops.linear; any strides, so a layout prepared for one
    binding is still the right weight for another) or a :class:`PreparedLinear` (its op)."""
    if isinstance(weight, torch.Tensor):
        return ops.linear(x, weight)
    return getattr(ops, weight.op)(x, weight.weight)


@dataclass
class LayerWeights:
    """One decoder layer. qkv: `[(H + 2*Hk)*D, E]` (q, k, v rows stacked; Hk = H in lightning
    layers); gate_up: `[2F, E]`. Each linear is a dense tensor (as :func:`prepare_linear` made it: float32 on the CPU,
    the `[O, K]` view of a `[K, O]` contiguous tensor) or a :class:`PreparedLinear`. SALA only: o_gate `[H*D, E]` (attention layers), z `[H*D, E]`,
    q_norm / k_norm `[D]`, o_norm `[H*D]` (lightning layers); None where the config has none."""

    mixer: str
    input_norm: torch.Tensor
    qkv: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    o_gate: torch.Tensor | None = None
    z: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    o_norm: torch.Tensor | None = None


def _prepared(ops: BoundOps, weights: dict[str, torch.Tensor], name: str, optional: bool = False):
    """:func:`prepare_linear` of ``weights[name]`` (None when ``optional`` and absent). A dense result replaces the
    dict's entry (same values, the bound layout), so a prepared copy frees its `[O, K]` original here,
    one linear at a time, instead of the load holding both layouts of every linear until it ends."""
    weight = weights.get(name) if optional else weights[name]
    prepared = prepare_linear(ops, weight)
    if isinstance(prepared, torch.Tensor) and prepared is not weight:
        weights[name] = prepared
    return prepared


LINEAR_NAMES = {"qkv": "self_attn.qkv_proj.weight", "o": "self_attn.o_proj.weight",
                "gate_up": "mlp.gate_up_proj.weight", "down": "mlp.down_proj.weight",
                "o_gate": "self_attn.o_gate.weight", "z": "self_attn.z_proj.weight"}
""":class:`LayerWeights` linear field -> its checkpoint tensor under ``model.layers.<i>.`` (after the
load's fusion, ``model.checkpoint.FUSED``); o_gate and z only in SALA checkpoints."""


def _layers(weights: dict[str, torch.Tensor], config: MiniCPMConfig, ops: BoundOps) -> list[LayerWeights]:
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        linear = {field: p + name for field, name in LINEAR_NAMES.items()}
        layers.append(LayerWeights(
            mixer=config.mixer(i),
            input_norm=weights[p + "input_layernorm.weight"],
            qkv=_prepared(ops, weights, linear["qkv"]),
            o=_prepared(ops, weights, linear["o"]),
            post_norm=weights[p + "post_attention_layernorm.weight"],
            gate_up=_prepared(ops, weights, linear["gate_up"]),
            down=_prepared(ops, weights, linear["down"]),
            o_gate=_prepared(ops, weights, linear["o_gate"], optional=True),
            z=_prepared(ops, weights, linear["z"], optional=True),
            q_norm=weights.get(attn + "q_norm.weight"),
            k_norm=weights.get(attn + "k_norm.weight"),
            o_norm=weights.get(attn + "o_norm.weight"),
        ))
    return layers


@dataclass
class ForwardOutput:
    """logits: `[B, T, V]` float32 on the model device (or None). hidden_states: the residual
    stream after the embedding and after each layer, `L+1` tensors `[B, T, E]` (when asked)."""

    logits: torch.Tensor | None
    hidden_states: list[torch.Tensor] | None = None


class MiniCPMForCausalLM:
    """A loaded, bound MiniCPM model. Build it with :func:`hal.load_model`."""

    def __init__(self, config: MiniCPMConfig, weights: dict[str, torch.Tensor], ops: BoundOps,
                 device: torch.device, dtype: torch.dtype, path: Path | None = None,
                 generation: GenerationDefaults | None = None,
                 tokenizer_loader: Callable[[], object] | None = None, tp: TensorParallel | None = None,
                 decoded_at_load: dict[str, str] | None = None):
        self.config = config
        # checkpoint name of a quantized linear the load decoded to dense -> why (model.checkpoint.DecodedAtLoad)
        self.decoded_at_load = dict(decoded_at_load or {})
        # tensor parallel (model/tp.py): this rank's slice of heads / FFN / vocabulary, its collectives
        self.tp = tp if tp is not None else single_rank(config, device)
        shard = self.tp.plan
        self.ops = ops
        self.device = device
        self.dtype = dtype
        self.path = path
        self.generation_defaults = generation or GenerationDefaults()
        # a dense tensor, or a quantized table kept as its codes (model/table.py)
        self.embed = prepare_embedding(ops, weights["model.embed_tokens.weight"], dtype, device)
        self.final_norm = weights["model.norm.weight"]
        self.lm_head = self.embed if config.tie_word_embeddings else weights["lm_head.weight"]
        self.head = prepare_head(ops, self.lm_head)
        self.layers = _layers(weights, config, ops)
        self.rope = RopeTable(config, device)
        # LongRoPE's mscale is applied here, not in the cos/sin tables (model/rope.py): as mscale**2
        # on every scale that multiplies a rotated q.k (attention and InfLLM-v2 selection; lightning)
        rotated = self.rope.qk_scale
        self.attn_scale = config.head_dim ** -0.5 * (rotated if config.attn_use_rope else 1.0)
        # this rank's lightning heads (all of them at tp=1)
        self.lightning = replace(config.lightning, heads=shard.heads) if config.lightning else None
        self.lightning_scale = (config.lightning.scale * (rotated if config.lightning.use_rope else 1.0)
                                if config.lightning else None)
        # per layer α (μP residual scale); a list so validation/faults.py can drop one layer's
        self.residual_scales = [config.residual_scale] * config.num_hidden_layers
        self.lightning_layers = frozenset(i for i, layer in enumerate(self.layers) if layer.mixer == "lightning")
        self.slopes = (alibi_slopes(config.lightning.heads)[shard.head_start:shard.head_start + shard.heads].to(device)
                       if config.lightning else None)
        self._tokenizer = None
        self._tokenizer_loader = tokenizer_loader  # GGUF: the tokenizer comes from the file's metadata

    # -- public API ---------------------------------------------------------------------------

    @property
    def bound_ops(self) -> dict[str, str]:
        """Op name -> implementation serving it (e.g. ``{"rms_norm": "cpu.torch", ...}``)."""
        return {op: b.impl for op, b in self.ops.record.items()}

    @property
    def tokenizer(self):
        if self._tokenizer is None and self._tokenizer_loader is not None:
            self._tokenizer = self._tokenizer_loader()
        if self._tokenizer is None:
            if self.path is None:
                raise InputError("this model was built without a checkpoint folder, so it has no tokenizer")
            from model.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    def check_input_ids(self, input_ids: torch.Tensor, extra: int = 0) -> None:
        """Raise :class:`InputError` unless input_ids is a `[B, T]` int64 tensor of valid ids whose
        length (+ ``extra`` tokens to come) fits max_position_embeddings."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long or input_ids.dim() != 2:
            what = f"{input_ids.dtype} tensor of shape {list(input_ids.shape)}" if isinstance(
                input_ids, torch.Tensor) else type(input_ids).__name__
            raise InputError(f"input_ids must be a torch.LongTensor of shape [batch, seq], got {what}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise InputError(f"input_ids must not be empty, got shape {list(input_ids.shape)}")
        limit = self.config.max_position_embeddings
        if input_ids.shape[1] + extra > limit:
            raise InputError(f"prompt of {input_ids.shape[1]} tokens"
                             + (f" + {extra} new tokens" if extra else "")
                             + f" exceeds max_position_embeddings={limit}")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise InputError(f"input_ids holds token id {bad}, "
                             f"outside [0, vocab_size={self.config.vocab_size})")

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids `[B, T]` int64 -> next-token logits `[B, T, V]`, float32, on the CPU."""
        self.check_input_ids(input_ids)
        out = self.forward(input_ids.to(self.device))
        return out.logits.float().cpu()

    def generate(self, *args, **kwargs):
        """See :func:`model.generation.generate`."""
        from model.generation import generate

        if self.tp.size > 1 and kwargs.get("seed") is None:
            kwargs["seed"] = self.tp.group.shared_seed()  # every rank samples the same tokens
        return generate(self, *args, **kwargs)

    def head_weight(self, ops: BoundOps):
        """What ``ops.logits`` receives: the prepared lm_head (:attr:`head`) when ``ops`` binds the
        implementation that prepared it, from this very tensor; else the dense ``lm_head`` (so a
        copy of the model with other ops or rounded weights, validation/floor.py, never passes a
        stale or foreign layout)."""
        head = self.head
        if head is not None and head.source is self.lm_head and ops.record["logits"].impl == head.impl:
            return head.weight
        if isinstance(self.lm_head, PreparedTable):
            return self.lm_head.for_ops(ops, "logits")
        return self.lm_head

    def embed_weight(self, ops: BoundOps):
        """What ``ops.embedding`` receives: the dense table, or a quantized table's prepared form
        (:meth:`model.table.PreparedTable.for_ops`)."""
        return self.embed.for_ops(ops, "embedding") if isinstance(self.embed, PreparedTable) else self.embed

    # -- forward ------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                kv_start: torch.Tensor | None = None, output_hidden_states: bool = False,
                logits_last_only: bool = False,
                hidden_hook: Callable[[int, torch.Tensor], None] | None = None,
                context_len: int = 0) -> ForwardOutput:
        """One forward pass over T new tokens (on the model device).

        input_ids: `[B, T]` int64. cache: filled with these tokens' keys/values when given
        (columns continue from ``cache.length``; each row's real tokens go to its slots 0, 1, ...).
        kv_start: `[B]` first real column per row (left padding), or None. logits_last_only:
        compute logits for the last position only. context_len: InfLLM-v2 decides dense or
        sparse as if the longest row were at least this long (chunked prefill passes the whole
        prompt's length, so every chunk attends as one prefill of the prompt would).
        """
        batch, new = input_ids.shape
        if cache is not None:
            self._check_cache(cache)
        past = cache.length if cache is not None else 0
        positions = torch.arange(past, past + new, device=self.device).expand(batch, new)
        if kv_start is not None:
            positions = (positions - kv_start[:, None]).clamp(min=0)
        sparse = self.config.sparse
        if cache is None and sparse is not None:
            real = new - (int(kv_start.min()) if kv_start is not None else 0)
            if sparse.applies(real):
                cache = self.new_cache(batch, new)  # sparse attention reads keys in the cache layout
        slots = kv_lens = None
        if cache is not None:
            slots, kv_lens = cache.plan(new, kv_start)
            slots = slots.to(self.device)
        use_sparse = sparse is not None and kv_lens is not None and \
            sparse.applies(max(int(kv_lens.max()), context_len))
        out = self.run(self.ops, input_ids, self.rope(positions), cache, kv_start, past > 0, slots, kv_lens,
                       output_hidden_states, logits_last_only, hidden_hook, sparse=use_sparse)
        if cache is not None:
            cache.advance(new)
        return out

    def _check_cache(self, cache: KVCache) -> None:
        """One-line InputError when ``cache`` lacks what this model's layers keep in it."""
        geometry = self.config.sparse.geometry if self.config.sparse is not None else None
        if set(cache.states) != self.lightning_layers or cache.sparse != geometry \
                or len(cache.keys) != len(self.layers):
            raise InputError("this KV cache was not made for this model (its layer types or sparse geometry "
                             "differ): create it with model.new_cache(batch, capacity)")

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty KV cache for ``batch`` rows of up to ``capacity`` tokens on the model device."""
        cfg = self.config
        shard = self.tp.plan
        return KVCache(cfg.num_hidden_layers, batch, capacity, shard.kv_heads, cfg.head_dim, self.dtype,
                       self.device, self.lightning_layers, shard.heads if cfg.lightning else 0,
                       cfg.sparse.geometry if cfg.sparse else None)

    def run(self, ops: BoundOps, input_ids: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
            cache: KVCache | None, kv_start: torch.Tensor | None, decode: bool,
            slots: torch.Tensor | None, kv_lens: torch.Tensor | None, output_hidden_states: bool = False,
            logits_last_only: bool = False, hidden_hook: Callable[[int, torch.Tensor], None] | None = None,
            sparse: bool = False, layers_runner: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
            ) -> ForwardOutput:
        """The layers and logits, given where the tokens go (device work only: :meth:`forward`
        plans on the host; ``model/decode_graph.py`` captures this for decode steps).

        rope: (cos, sin) `[B, T, D]` of the tokens' positions. slots `[B, T]` / kv_lens `[B]`: the
        cache plan (see :class:`KVCache`). decode: attend over the cache (attention_decode)
        instead of the new tokens alone (attention_prefill, left padding by kv_start). sparse:
        InfLLM-v2 block-sparse attention over the cache instead (needs a cache). layers_runner:
        ``(x, residual) -> (x, residual)`` in place of the loop over :meth:`decoder_layer`
        (``model/compiled_decode.py``: the same layers, compiled; no hidden states or hook)."""
        cfg = self.config
        cos, sin = rope
        real = self._real_tokens(input_ids, cache, kv_start) if self.lightning_layers else None
        h = self.tp.embed(ops, input_ids, self.embed_weight(ops)) * cfg.scale_emb
        hidden: list[torch.Tensor] | None = [h] if output_hidden_states else None
        residual = h
        x = ops.rms_norm(h, self.layers[0].input_norm, cfg.rms_norm_eps)
        if layers_runner is not None:
            if hidden is not None or hidden_hook is not None:
                raise InputError("run: a layers_runner gives no per-layer hidden states")
            x, residual = layers_runner(x, residual)
        else:
            for index, layer in enumerate(self.layers):
                next_norm = self.layers[index + 1].input_norm if index + 1 < len(self.layers) else self.final_norm
                x, residual = self.decoder_layer(ops, index, layer, x, residual, next_norm, cos, sin, cache,
                                                 kv_start, decode, slots, kv_lens, sparse, real)
                if hidden is not None:
                    hidden.append(residual)
                if hidden_hook is not None:
                    hidden_hook(index, residual)
        if logits_last_only and x.shape[1] > 1:
            x = x[:, -1:]
        logits = self.tp.logits(ops, x / cfg.logit_scale, self.head_weight(ops))
        return ForwardOutput(logits=logits, hidden_states=hidden)

    def decoder_layer(self, ops: BoundOps, index: int, layer: LayerWeights, x: torch.Tensor, residual: torch.Tensor,
                      next_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                      kv_start: torch.Tensor | None, decode: bool, slots: torch.Tensor | None,
                      kv_lens: torch.Tensor | None, sparse: bool, real: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``: x `[B, T, E]` (its input norm applied), residual `[B, T, E]` -> the next
        layer's normed input (``next_norm``: its input norm, or the final norm) and residual."""
        cfg = self.config
        alpha = self.residual_scales[index]
        if layer.mixer == "lightning":
            attn = self.tp.reduce(self._lightning(ops, index, layer, x, cos, sin, cache, real))
        else:
            attn = self.tp.reduce(self._attention(ops, index, layer, x, cos, sin, cache, kv_start, decode, slots,
                                                  kv_lens, sparse))
        x, residual = ops.add_rms_norm(attn, residual, layer.post_norm, cfg.rms_norm_eps, alpha)
        gate, up = _linear(ops, x, layer.gate_up).chunk(2, dim=-1)
        mlp = _linear(ops, ops.swiglu(gate, up), layer.down)
        return ops.add_rms_norm(self.tp.reduce(mlp), residual, next_norm, cfg.rms_norm_eps, alpha)

    def _attention(self, ops: BoundOps, index: int, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, cache: KVCache | None, kv_start: torch.Tensor | None, decode: bool,
                   slots: torch.Tensor | None, kv_lens: torch.Tensor | None, sparse: bool) -> torch.Tensor:
        """The first chunk into an empty cache (or no cache) attends over its own keys
        (attention_prefill, left padding by kv_start); decode chunks read the whole cache
        buffers (attention_decode, kv_lens); sparse chunks read the blocks InfLLM-v2 selects."""
        cfg = self.config
        batch, new, _ = x.shape
        d = cfg.head_dim
        heads, kv_heads = self.tp.plan.heads, self.tp.plan.kv_heads
        # one view as heads, then split: the same q/k/v views as splitting the width first (2 calls, not 4)
        qkv = _linear(ops, x, layer.qkv).view(batch, new, heads + 2 * kv_heads, d)
        q, k, v = qkv.split((heads, kv_heads, kv_heads), dim=2)
        if cfg.attn_use_rope:
            q, k = ops.rotary(q, k, cos, sin)
        if cache is not None:
            ops.kv_write(cache.keys[index], cache.values[index], k, v, slots)
            if index in cache.kernels:
                self._update_kernels(ops, cache, index, kv_lens, new)
            if sparse:
                o = self._sparse_attention(ops, q, cache, index, kv_lens)
            elif decode:
                o = ops.attention_decode(q, cache.keys[index], cache.values[index], kv_lens, self.attn_scale)
            else:
                o = ops.attention_prefill(q, k, v, kv_start, self.attn_scale)
        else:
            o = ops.attention_prefill(q, k, v, kv_start, self.attn_scale)
        o = o.reshape(batch, new, -1)
        if layer.o_gate is not None:  # SALA: o * sigmoid(o_gate(x)) before o_proj
            o = ops.sigmoid_gate(o, _linear(ops, x, layer.o_gate))
        return _linear(ops, o, layer.o)

    def _real_tokens(self, input_ids: torch.Tensor, cache: KVCache | None,
                     kv_start: torch.Tensor | None) -> torch.Tensor | None:
        """`[B, T]` bool, False for left-padding columns (``column < kv_start``), or None."""
        if kv_start is None:
            return None
        past = cache.length if cache is not None else 0
        columns = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        return columns[None, :] >= kv_start.to(input_ids.device)[:, None]

    def _lightning(self, ops: BoundOps, index: int, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, cache: KVCache | None, real: torch.Tensor | None) -> torch.Tensor:
        """SALA's lightning layer (research/sala_spec.md §5.1): per-head q/k RMSNorm, RoPE,
        decayed linear attention from the cached state (zeros without a cache), RMSNorm over
        all heads, sigmoid gate z_proj(x), o_proj. Left-padding tokens get zero keys, so they
        add nothing to the state (they all precede the real tokens, and the state starts at 0)."""
        cfg, spec = self.config, self.lightning
        batch, new, _ = x.shape
        heads, d = spec.heads, cfg.head_dim
        q, k, v = (t.view(batch, new, heads, d) for t in _linear(ops, x, layer.qkv).chunk(3, dim=-1))
        if spec.qk_norm:
            q = ops.rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = ops.rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        if spec.use_rope:
            q, k = ops.rotary(q, k, cos, sin)
        if real is not None:
            k = k * real[:, :, None, None].to(k.dtype)
        if cache is not None:
            state = cache.states[index]
        else:
            state = torch.zeros(batch, heads, d, d, dtype=torch.float32, device=x.device)
        o, new_state = ops.lightning_attention(q, k, v, self.slopes, state, self.lightning_scale)
        if cache is not None:
            state.copy_(new_state)  # in place: the cache's buffer keeps its address (decode graphs)
        o = o.reshape(batch, new, heads * d)
        if layer.o_norm is not None:  # over all heads: gathered from the ranks, normed, sliced back
            o = self.tp.local_heads(ops.rms_norm(self.tp.gather_heads(o), layer.o_norm, cfg.rms_norm_eps))
        if layer.z is not None:
            o = ops.sigmoid_gate(o, _linear(ops, x, layer.z))
        return _linear(ops, o, layer.o)

    def _update_kernels(self, ops: BoundOps, cache: KVCache, index: int, kv_lens: torch.Tensor, new: int) -> None:
        """Keep layer ``index``'s semantic kernels in step with its keys: a decode step appends the
        kernel its key completes (if any); a longer chunk recompresses the cache rows."""
        g, keys = cache.sparse, cache.keys[index]
        for kernels, size, stride in ((cache.kernels[index], g.kernel_size, g.kernel_stride),
                                      (cache.coarse[index], g.coarse_size, g.coarse_stride)):
            if new == 1:
                ops.infllm_append_kernel(kernels, keys, kv_lens, size, stride)
            else:
                kernels.copy_(ops.infllm_compress_keys(keys, kv_lens, size, stride))

    def _sparse_attention(self, ops: BoundOps, q: torch.Tensor, cache: KVCache, index: int,
                          kv_lens: torch.Tensor) -> torch.Tensor:
        """InfLLM-v2 over layer ``index``'s cache: block selection per query and KV head from the
        cached semantic kernels (fine, and coarse for the normaliser), then attention over the
        selected blocks."""
        g = self.config.sparse.geometry
        blocks = ops.infllm_select_blocks(self.tp.group_queries(q), cache.kernels[index], cache.coarse[index],
                                          kv_lens, g, self.attn_scale)
        return ops.block_sparse_attention(q, cache.keys[index], cache.values[index], blocks, kv_lens, g.block_size,
                                          self.attn_scale)
