from __future__ import annotations

import torch


def sample_ref(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    """logits `[B, V]` -> token ids `[B]` int64. See ``hal/ops.py`` for the exact rule."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    picks = []
    for row in logits:
        order = torch.argsort(row / temperature, descending=True, stable=True)
        keep = row.numel() if top_k <= 0 else min(top_k, row.numel())
        order = order[:keep]
        probs = torch.softmax(row[order] / temperature, dim=0)
        cumulative = 0.0
        for n in range(keep):
            cumulative += float(probs[n])
            if cumulative >= top_p:
                keep = n + 1
                break
        kept = probs[:keep] / probs[:keep].sum()
        choice = torch.multinomial(kept, 1, generator=generator)
        picks.append(order[choice])
    return torch.cat(picks)
