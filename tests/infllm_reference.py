"""An independent InfLLM-v2 attention and a dense-MiniCPM forward, float64 plain torch, written
from research/minicpm4_spec.md §2-§4 (not from model/, hal/ or backends/): weights come from
the ``safetensors`` package, everything else is here.

InfLLM-v2 for one sequence, query at position p (every position attends sparsely: the model's
switch is per forward, and a prompt past dense_len makes every forward sparse), per KV head:
  1. semantic kernels: mean of keys c*s .. c*s+l-1 (fine l, s; coarse 4l, 4s), full chunks only;
     a kernel is visible to p when its last key is <= p (spec §4.4 step 2, causal rule);
  2. lse_h = logsumexp(q_h . Kc2 / sqrt(D)) over visible coarse kernels;
     S[j] = sum over the group's heads of exp(q_h . Kc1_j / sqrt(D) - lse_h);
  3. block b <= qb = p // B scores +inf when b < init_blocks or qb - local <= b <= qb, else
     max S[j] over the pooling window j in [r*b - 1, r*b + r - 1] (r = B / s; spec: window r+1,
     padding 1, valid for l = 2s);
  4. the budget = topk + local highest blocks are attended (all of them when fewer exist; equal
     scores: the lower block first, the tie rule of hal/ops.py's contract: torch.topk's is not
     specified);
  5. softmax(q . k / sqrt(D)) over keys <= p of the chosen blocks.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file


@dataclass(frozen=True)
class Sparse:
    """``sparse_config`` as the spec's v2 code reads it (§4.1)."""

    kernel_size: int
    kernel_stride: int
    block_size: int
    init_blocks: int
    local_blocks: int
    budget: int

    @classmethod
    def from_config(cls, cfg: dict) -> "Sparse":
        s = cfg["sparse_config"]
        local = s["window_size"] // s["block_size"]
        return cls(s["kernel_size"], s["kernel_stride"], s["block_size"], s["init_blocks"], local, s["topk"] + local)


@dataclass
class Selection:
    """What step 4 decided for one (layer, query, KV head): kept for the tests' margin checks."""

    position: int
    chosen: list[int]
    margin: float  # relative gap between the last chosen and the best dropped scored block
    dropped: bool  # some past block was left out


def _kernels(k: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """k `[T, D]` -> `[N, D]`, N = (T - size) // stride + 1 full chunks."""
    count = max(0, (k.shape[0] - size) // stride + 1)
    return torch.stack([k[c * stride:c * stride + size].mean(0) for c in range(count)]) if count else k[:0]


def infllm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp: Sparse, scale: float,
                     log: list[Selection] | None = None) -> torch.Tensor:
    """q `[T, H, D]`, k/v `[T, Hk, D]` (positions 0..T-1, one sequence) -> `[T, H, D]` float64."""
    assert sp.kernel_size == 2 * sp.kernel_stride and sp.block_size % sp.kernel_stride == 0
    t_len, heads, _ = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    r = sp.block_size // sp.kernel_stride
    out = torch.zeros_like(q)
    for kh in range(kv_heads):
        fine = _kernels(k[:, kh], sp.kernel_size, sp.kernel_stride)
        coarse = _kernels(k[:, kh], 4 * sp.kernel_size, 4 * sp.kernel_stride)
        fine_last = [c * sp.kernel_stride + sp.kernel_size - 1 for c in range(fine.shape[0])]
        coarse_last = [c * 4 * sp.kernel_stride + 4 * sp.kernel_size - 1 for c in range(coarse.shape[0])]
        for p in range(t_len):
            qs = q[p, kh * group:(kh + 1) * group]  # [G, D]
            qb = p // sp.block_size
            vis_f = [j for j, last in enumerate(fine_last) if last <= p]
            vis_c = [j for j, last in enumerate(coarse_last) if last <= p]
            score = [0.0] * fine.shape[0]
            if vis_c and vis_f:
                lse = torch.logsumexp(qs @ coarse[vis_c].T * scale, dim=-1)  # [G]
                s = torch.exp(qs @ fine[vis_f].T * scale - lse[:, None]).sum(0)
                for j, value in zip(vis_f, s.tolist()):
                    score[j] = value
            forced, scored = [], []
            for b in range(qb + 1):
                if b < sp.init_blocks or b >= qb - sp.local_blocks:
                    forced.append(b)
                else:
                    window = [score[j] for j in range(r * b - 1, r * b + r) if 0 <= j < len(score)]
                    scored.append((max(window) if window else -math.inf, b))
            room = sp.budget - len(forced)
            assert room >= 0, "the forced blocks must fit the budget"
            ranked = sorted(scored, key=lambda item: -item[0])  # stable: ties go to the lower block
            chosen = forced + [b for _, b in ranked[:room]]
            margin = math.inf
            if 0 < room < len(ranked):
                kept, dropped = ranked[room - 1][0], ranked[room][0]
                # equal scores come from the one kernel two neighbouring blocks' windows share
                # (equal in any precision, so the tie rule decides): no near-tie
                margin = (kept - dropped) / kept if kept != dropped else math.inf
            if log is not None:
                log.append(Selection(p, sorted(chosen), margin, len(chosen) < qb + 1))
            keys = [j for j in range(p + 1) if j // sp.block_size in chosen]
            for i, h in enumerate(range(kh * group, (kh + 1) * group)):
                att = torch.softmax(k[keys, kh] @ qs[i] * scale, dim=0)
                out[p, h] = att @ v[keys, kh]
    return out


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _longrope(cfg: dict, t_len: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[T, 1, D]` of MiniCPMLongRoPE (spec §3.1): the cache is built at
    max_position_embeddings, so the long factors apply whenever that exceeds the original."""
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    scaling, mscale = cfg.get("rope_scaling"), 1.0
    if scaling:
        original = scaling["original_max_position_embeddings"]
        long = cfg["max_position_embeddings"] > original
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float64)
        inv = inv / ext
        scale = cfg["max_position_embeddings"] / original
        mscale = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
    ang = torch.arange(t_len, dtype=torch.float64)[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    return (emb.cos() * mscale)[:, None], (emb.sin() * mscale)[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(Path(folder) / "model.safetensors")).items()}


def minicpm_logits(folder: Path, ids: list[int], sparse: bool = True,
                   log: list[Selection] | None = None) -> torch.Tensor:
    """Next-token logits `[T, V]` float64 of one prompt through a dense-layout MiniCPM checkpoint
    (spec §2), attention InfLLM-v2 (``sparse``) or dense causal."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    w = load_weights(folder)
    e, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, eps, layers = e // heads, cfg["rms_norm_eps"], cfg["num_hidden_layers"]
    alpha, scale = cfg["scale_depth"] / math.sqrt(layers), 1.0 / math.sqrt(d)
    sp = Sparse.from_config(cfg) if sparse else None
    t = len(ids)
    cos, sin = _longrope(cfg, t, d)
    h = w["model.embed_tokens.weight"][ids] * cfg["scale_emb"]
    for i in range(layers):
        p = f"model.layers.{i}."
        x = _rms(h, w[p + "input_layernorm.weight"], eps)
        q = _rotate((x @ w[p + "self_attn.q_proj.weight"].T).view(t, heads, d), cos, sin)
        k = _rotate((x @ w[p + "self_attn.k_proj.weight"].T).view(t, kv_heads, d), cos, sin)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(t, kv_heads, d)
        o = infllm_attention(q, k, v, sp, scale, log) if sp else dense_attention(q, k, v, scale)
        h = h + alpha * (o.reshape(t, e) @ w[p + "self_attn.o_proj.weight"].T)
        y = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = y @ w[p + "mlp.gate_proj.weight"].T, y @ w[p + "mlp.up_proj.weight"].T
        h = h + alpha * ((torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T)
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return (_rms(h, w["model.norm.weight"], eps) / (e / cfg["dim_model_base"])) @ head.T


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA softmax attention: q `[T, H, D]`, k/v `[T, Hk, D]` -> `[T, H, D]`."""
    t, heads, _ = q.shape
    group = heads // k.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    out = torch.empty_like(q)
    for h in range(heads):
        s = (q[:, h] @ k[:, h // group].T) * scale
        out[:, h] = torch.softmax(s.masked_fill(~causal, -math.inf), -1) @ v[:, h // group]
    return out
