"""``lightning_attention`` in chunked form (the SALA spec's prefill form, sala_spec.md §5.4; fla's
``naive_chunk_simple_gla``): plain torch on any device, so cpu, cuda and npu all register it.

Within a chunk of C tokens the outputs are a causal attention matrix weighted by the decay
``lambda^(i-j)``, plus the carried state decayed to each position; the state then advances by
the whole chunk at once. Everything runs in float32; o is rounded once at the end and the state
stays float32. Loops only over chunks (a count from the shapes), never over tensor values, so a
device graph can capture it.
"""
from __future__ import annotations

import torch

CHUNK = 64  # fla's default chunk size (chunk_simple_gla)


def _check_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                state: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape[1] < 1 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"lightning_attention: q, k, v must share one shape [B, T >= 1, H, D], got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    batch, _, heads, dim = q.shape
    if slopes.shape != (heads,):
        raise ValueError(f"lightning_attention: slopes must be [H] = [{heads}], got {list(slopes.shape)}")
    if state.shape != (batch, heads, dim, dim) or state.dtype != torch.float32:
        raise ValueError(f"lightning_attention: state must be float32 [B, H, D, D] = "
                         f"{[batch, heads, dim, dim]}, got {str(state.dtype).removeprefix('torch.')} "
                         f"{list(state.shape)}")


def lightning_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                            state: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Catalogue ``lightning_attention``.

    Args:
        q, k, v (Tensor): `[B, T, H, D]`, contiguous in D, one dtype.
        slopes (Tensor): `[H]` float32, per-head decay rate (decay per token ``exp(-slopes)``).
        state (Tensor): `[B, H, D, D]` float32, ``[D_k, D_v]`` per head; not modified.
        scale (float): multiplies q, normally ``1/sqrt(D)``.

    Returns:
        o (Tensor): `[B, T, H, D]`, contiguous, q's dtype.
        new_state (Tensor): `[B, H, D, D]` float32, the state after the T tokens.
    """
    _check_args(q, k, v, slopes, state)
    new = q.shape[1]
    qf = q.float().transpose(1, 2) * scale  # [B, H, T, D]
    kf = k.float().transpose(1, 2)
    vf = v.float().transpose(1, 2)
    rate = slopes.float()[:, None]  # [H, 1]
    size = min(CHUNK, new)
    pos = torch.arange(size, device=q.device, dtype=torch.float32)
    lag = pos[:, None] - pos[None, :]
    # [H, C, C]: lambda^(i-j) for j <= i, else 0 (clamped first: exp of a positive lag could overflow)
    intra = torch.exp(-rate[:, :, None] * lag.clamp(min=0)) * (lag >= 0)
    carried = torch.exp(-rate * (pos + 1))  # [H, C]: lambda^(i+1), the carried state's weight at i
    s = state
    outs = []
    for start in range(0, new, size):
        qc, kc, vc = (x[:, :, start:start + size] for x in (qf, kf, vf))
        n = qc.shape[2]
        scores = (qc @ kc.transpose(-1, -2)) * intra[:, :n, :n]
        outs.append((qc * carried[:, :n, None]) @ s + scores @ vc)
        to_end = torch.exp(-rate * (n - 1 - pos[:n]))  # [H, n]: lambda^(n-1-j), token j's weight at chunk end
        s = torch.exp(-rate * n)[..., None] * s + (kc * to_end[..., None]).transpose(-1, -2) @ vc
    o = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype).contiguous()
    return o, s
