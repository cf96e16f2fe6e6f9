"""Reference of ``lightning_attention``: the Simple GLA recurrence of ``hal/ops.py``, one token at
a time, in float32 (the decode form of the SALA spec, sala_spec.md §5.3)."""
from __future__ import annotations

import torch


def lightning_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                            state: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k/v `[B, T, H, D]`, slopes `[H]`, state `[B, H, D, D]` (``[D_k, D_v]`` per head) ->
    (o `[B, T, H, D]` in q's dtype, new_state `[B, H, D, D]` float32). Per row and head:
    ``S = exp(-slope) * S + outer(k_t, v_t)``, then ``o_t = (scale * q_t) @ S``."""
    batch, new, heads, dim = q.shape
    out = torch.zeros(batch, new, heads, dim, dtype=torch.float32)
    new_state = torch.zeros(batch, heads, dim, dim, dtype=torch.float32)
    for b in range(batch):
        for h in range(heads):
            decay = torch.exp(-slopes[h].float())
            s = state[b, h].float().clone()
            for t in range(new):
                s = decay * s + torch.outer(k[b, t, h].float(), v[b, t, h].float())
                out[b, t, h] = (scale * q[b, t, h].float()) @ s
            new_state[b, h] = s
    return out.to(q.dtype), new_state
