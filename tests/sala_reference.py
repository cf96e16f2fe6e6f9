"""An independent MiniCPM-SALA forward in float64 plain torch, written from
research/sala_spec.md §3-§5 (not from model/ or the op catalogue): weights read with the
``safetensors`` package, softmax layers dense and causal (valid below dense_len, or when the
sparse budget covers every block) or, with ``sparse=True``, the independent InfLLM-v2 of
tests/infllm_reference.py on the un-rotated (NoPE) q/k; lightning layers as the token-by-token
recurrence."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from infllm_reference import Selection, Sparse, infllm_attention
from safetensors.torch import load_file


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x `[T, H, D]`, NeoX halves, positions 0..T-1."""
    t, _, d = x.shape
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    half = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + half * sin


def _slopes(n: int) -> list[float]:  # ALiBi, power-of-two head counts (what the test presets use)
    return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]


def sala_logits(folder: Path, ids: list[int], sparse: bool = False,
                log: list[Selection] | None = None) -> torch.Tensor:
    """Next-token logits `[T, V]` (float64) of one prompt; ``sparse``: every softmax layer
    attends with InfLLM-v2 (what the model does once the sequence reaches dense_len)."""
    cfg = json.loads((folder / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}
    e, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, eps, layers = e // heads, cfg["rms_norm_eps"], cfg["num_hidden_layers"]
    alpha = cfg["scale_depth"] / math.sqrt(layers)
    t = len(ids)
    h = w["model.embed_tokens.weight"][ids] * cfg["scale_emb"]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(layers):
        p = f"model.layers.{i}."
        x = _rms(h, w[p + "input_layernorm.weight"], eps)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(t, heads, d)
        k = x @ w[p + "self_attn.k_proj.weight"].T
        v = x @ w[p + "self_attn.v_proj.weight"].T
        if cfg["mixer_types"][i] == "minicpm4":  # NoPE softmax attention, GQA, output gate
            k, v = k.view(t, kv_heads, d), v.view(t, kv_heads, d)
            group = heads // kv_heads
            if sparse:
                o = infllm_attention(q, k, v, Sparse.from_config(cfg), 1 / math.sqrt(d), log)
            else:
                o = torch.empty(t, heads, d, dtype=torch.float64)
                for head in range(heads):
                    s = (q[:, head] @ k[:, head // group].T) / math.sqrt(d)
                    o[:, head] = torch.softmax(s.masked_fill(~causal, -math.inf), -1) @ v[:, head // group]
            o = o.reshape(t, e) * torch.sigmoid(x @ w[p + "self_attn.o_gate.weight"].T)
        else:  # lightning: q/k RMSNorm per head, RoPE, S = lambda S + k^T v, o = (q / sqrt(d)) S
            k, v = k.view(t, heads, d), v.view(t, heads, d)
            q = _rope(_rms(q, w[p + "self_attn.q_norm.weight"], eps), cfg["rope_theta"])
            k = _rope(_rms(k, w[p + "self_attn.k_norm.weight"], eps), cfg["rope_theta"])
            o = torch.empty(t, heads, d, dtype=torch.float64)
            for head, slope in enumerate(_slopes(heads)):
                state = torch.zeros(d, d, dtype=torch.float64)
                for step in range(t):
                    state = math.exp(-slope) * state + torch.outer(k[step, head], v[step, head])
                    o[step, head] = (q[step, head] / math.sqrt(d)) @ state
            o = _rms(o.reshape(t, e), w[p + "self_attn.o_norm.weight"], eps)
            o = o * torch.sigmoid(x @ w[p + "self_attn.z_proj.weight"].T)
        h = h + alpha * (o @ w[p + "self_attn.o_proj.weight"].T)
        y = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = y @ w[p + "mlp.gate_proj.weight"].T, y @ w[p + "mlp.up_proj.weight"].T
        h = h + alpha * ((torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T)
    final = _rms(h, w["model.norm.weight"], eps) / (e / cfg["dim_model_base"])
    return final @ w["lm_head.weight"].T
