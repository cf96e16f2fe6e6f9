"""Megatron-style tensor-parallel sharding of a MiniCPM checkpoint: which rows or columns of each
Hugging Face tensor rank r of N keeps (vLLM's QKVParallelLinear / MergedColumnParallelLinear /
RowParallelLinear / VocabParallelEmbedding, rewritten for this model core).

    column-parallel (rows of `[O, E]` split)   q_proj, k_proj, v_proj, gate_proj, up_proj, and SALA's
                                               o_gate, z_proj: each rank computes its heads / its F slice
    row-parallel (columns of `[E, K]` split)   o_proj, down_proj: partial sums, one all_reduce each
    vocab-parallel (rows of `[V, E]` split)    embed_tokens (masked lookup + all_reduce) and lm_head
                                               (local logits, all_gather of the V columns)
    replicated                                 every norm (SALA's o_norm over all heads too: the heads
                                               are gathered before it), the μP scalars, RoPE tables

Heads: rank r keeps query heads ``[r*H/N, (r+1)*H/N)``. KV heads are split the same way when N
divides Hk; when N > Hk (MiniCPM4 has Hk = 2) N must be a multiple of Hk and each rank keeps the
one KV head its query heads read (``h // (H/Hk)``), replicated on N/Hk ranks. Lightning layers
(Hk = H there) split by head; their recurrent state is per rank. The vocabulary is split in
shards of ``ceil(V/N)`` rows (the last one shorter when N does not divide V: nothing is refused,
the gathered logits drop the padding columns).

Each rank reads only its slice: :meth:`ShardPlan.part` says which (dim, start, length) of a
tensor, and the safetensors / GGUF readers narrow the memory-mapped view before converting it.
The fused q/k/v and gate/up weights (``model.checkpoint.FUSED``) are built from the slices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hal.errors import InputError
from model.config import MiniCPMConfig

Part = tuple[int, int, int]
"""(dim, start, length): the rows (dim 0) or columns (dim 1) of a tensor a rank keeps."""


@dataclass(frozen=True)
class ShardPlan:
    """What rank ``rank`` of ``size`` holds. Counts are local: ``heads`` query heads from global
    head ``head_start``; ``kv_heads`` KV heads from ``kv_start`` (attention layers; replicated
    when ``kv_replicated``); ``ffn`` of the FFN width from ``ffn_start``; vocabulary rows
    ``[vocab_start, vocab_stop)`` of shards ``vocab_shard`` rows wide."""

    rank: int
    size: int
    head_dim: int
    heads: int
    head_start: int
    kv_heads: int
    kv_start: int
    kv_replicated: bool
    ffn: int
    ffn_start: int
    vocab: int
    vocab_start: int
    vocab_stop: int
    vocab_shard: int
    group_heads: int
    """Query heads per KV group (H / Hk): with kv_replicated, a group spans several ranks."""
    lightning_layers: frozenset[int] = frozenset()
    """SALA's lightning layers: their k_proj / v_proj have the query heads."""

    @property
    def group_start(self) -> int:
        """Global index of the first query head of this rank's KV group (kv_replicated only)."""
        return self.kv_start * self.group_heads

    def shapes(self, config: MiniCPMConfig) -> dict[str, int]:
        """The bind shapes (``BindContext.shapes``) of this rank's slice of the model."""
        return {**config.shapes(), "F": self.ffn, "V": self.vocab_stop - self.vocab_start,
                "H": self.heads, "Hk": self.kv_heads}

    def part(self, name: str) -> Part | None:
        """The slice of Hugging Face tensor ``name`` this rank keeps (None: all of it)."""
        d = self.head_dim
        if self.size == 1:
            return None
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return 0, self.vocab_start, self.vocab_stop - self.vocab_start
        if not name.startswith("model.layers."):
            return None
        _, _, layer, tail = name.split(".", 3)
        lightning = int(layer) in self.lightning_layers
        queries = (0, self.head_start * d, self.heads * d)
        if tail in ("self_attn.q_proj.weight", "self_attn.o_gate.weight", "self_attn.z_proj.weight"):
            return queries
        if tail in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            return queries if lightning else (0, self.kv_start * d, self.kv_heads * d)
        if tail == "self_attn.o_proj.weight":
            return 1, self.head_start * d, self.heads * d
        if tail in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            return 0, self.ffn_start, self.ffn
        if tail == "mlp.down_proj.weight":
            return 1, self.ffn_start, self.ffn
        return None


def narrow(tensor: torch.Tensor, part: Part | None) -> torch.Tensor:
    """The view of ``tensor`` a :data:`Part` names (no copy)."""
    return tensor if part is None else tensor.narrow(*part)


def plan(config: MiniCPMConfig, size: int, rank: int, source: str = "the checkpoint") -> ShardPlan:
    """The shard of rank ``rank`` of ``size``. Raises InputError (one line, the same on every
    rank) when ``size`` does not divide the query heads, the KV heads (and is not a multiple of
    them), or the FFN width, or when the checkpoint is GPTQ-quantized."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"tp must be an integer >= 1, got {size!r}")
    heads, kv, ffn, vocab = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size,
                             config.vocab_size)
    if size > 1 and (config.gptq is not None or config.int8 is not None):
        kind = "GPTQ" if config.gptq is not None else "int8"
        raise InputError(f"tp={size}: tensor parallel of {kind}-quantized weights is not supported "
                         f"({source} has a quantization_config); use tp=1")
    if heads % size:
        raise InputError(f"tp={size} does not divide num_attention_heads={heads} of {source}")
    if kv % size and size % kv:
        raise InputError(f"tp={size} does not divide num_key_value_heads={kv} of {source}, nor is it a multiple "
                         f"of it (KV heads are split, or replicated when tp is a multiple of them)")
    if ffn % size:
        raise InputError(f"tp={size} does not divide intermediate_size={ffn} of {source}")
    if (size - 1) * math.ceil(vocab / size) >= vocab:
        raise InputError(f"tp={size} leaves a rank no rows of vocab_size={vocab} of {source}")
    local_heads = heads // size
    replicated = size > kv
    kv_local = 1 if replicated else kv // size
    kv_start = (rank * local_heads) // (heads // kv) if replicated else rank * kv_local
    shard = math.ceil(vocab / size)
    start = min(rank * shard, vocab)
    return ShardPlan(rank=rank, size=size, head_dim=config.head_dim, heads=local_heads,
                     head_start=rank * local_heads, kv_heads=kv_local, kv_start=kv_start, kv_replicated=replicated,
                     ffn=ffn // size, ffn_start=rank * (ffn // size), vocab=vocab, vocab_start=start,
                     vocab_stop=min(start + shard, vocab), vocab_shard=shard, group_heads=heads // kv,
                     lightning_layers=frozenset(i for i in range(config.num_hidden_layers)
                                                if config.mixer(i) == "lightning"))


def single(config: MiniCPMConfig) -> ShardPlan:
    """The whole model (tp = 1)."""
    return plan(config, 1, 0)
