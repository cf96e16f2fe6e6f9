"""The tensor-parallel hooks of the model core (``model/minicpm.py`` calls them at the points
where a sharded model differs from a whole one). With one rank every hook is the plain op.

Layouts (local = this rank's slice, see ``model/sharding.py``):
    embed      ids `[B, T]` -> `[B, T, E]`: lookup of the ids this rank's vocabulary rows hold,
               zeros for the others, summed over the ranks (exact: one rank holds each id)
    reduce     partial `[..., E]` of a row-parallel linear (o_proj, down_proj) -> the sum over ranks
    logits     x `[..., E]`, lm_head slice `[V/N, E]` -> `[..., V]` float32 on every rank (the ranks'
               columns gathered in rank order, the padding of the last shard dropped): every rank
               samples the same token from the same logits and generation stays in lockstep
    gather_heads / local_heads   `[..., heads*D]` <-> `[..., H*D]`: SALA's o_norm normalises over all
               heads, so the heads are gathered, normed by the bound rms_norm, and sliced back
    group_queries  q `[B, T, heads, D]` -> the H/Hk query heads of this rank's KV group: InfLLM-v2
               selection sums scores over a whole group, which spans ranks when KV heads are replicated
"""
from __future__ import annotations

import torch

from hal.distributed import TPGroup
from hal.registry import BoundOps
from model.sharding import ShardPlan


class TensorParallel:
    """``plan`` (this rank's slice) and ``group`` (its collectives) as the model uses them."""

    def __init__(self, plan: ShardPlan, group: TPGroup):
        if plan.size != group.size or plan.rank != group.rank:
            raise ValueError(f"shard plan rank {plan.rank}/{plan.size} does not match the group's "
                             f"{group.rank}/{group.size}")
        self.plan = plan
        self.group = group

    @property
    def size(self) -> int:
        return self.plan.size

    def describe(self) -> str:
        return self.group.describe()

    def embed(self, ops: BoundOps, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return ops.embedding(ids, weight)
        local = ids - self.plan.vocab_start
        inside = (local >= 0) & (local < weight.shape[0])
        rows = ops.embedding(torch.where(inside, local, torch.zeros_like(local)), weight)
        return self.group.all_reduce(torch.where(inside[..., None], rows, torch.zeros_like(rows)))

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(partial)

    def logits(self, ops: BoundOps, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = ops.logits(x, weight)
        if self.size == 1:
            return out
        pad = self.plan.vocab_shard - out.shape[-1]
        if pad:
            out = torch.nn.functional.pad(out, (0, pad))
        return self.group.all_gather(out, dim=-1)[..., :self.plan.vocab]

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather(x, dim=-1)

    def local_heads(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        width = self.plan.heads * self.plan.head_dim
        return x.narrow(-1, self.plan.head_start * self.plan.head_dim, width)

    def group_queries(self, q: torch.Tensor) -> torch.Tensor:
        if not self.plan.kv_replicated:
            return q
        everyone = self.group.all_gather(q, dim=2)  # [B, T, H, D]
        return everyone.narrow(2, self.plan.group_start, self.plan.group_heads)


def single(config, device: torch.device) -> TensorParallel:
    """The hooks of a whole model (one rank)."""
    from model.sharding import single as whole

    return TensorParallel(whole(config), TPGroup.single(device))


def weight_bytes(model) -> int:
    """Bytes of the weights this rank holds (embedding, lm_head if untied, norms, layers; a
    prepared quantized linear or a quantized embedding table (``model/table.py``, once when tied)
    counts its ``prepared_bytes``, a prepared lm_head its extra bytes)."""
    tensors, tables = {}, {}
    for t in (model.embed, model.lm_head, model.final_norm):
        (tensors if isinstance(t, torch.Tensor) else tables)[id(t)] = t
    prepared = model.head.prepared_bytes if model.head is not None else 0
    prepared += sum(t.prepared_bytes for t in tables.values())
    for layer in model.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                tensors[id(value)] = value
            elif hasattr(value, "prepared_bytes"):
                prepared += value.prepared_bytes
    return prepared + sum(t.numel() * t.element_size() for t in tensors.values())
