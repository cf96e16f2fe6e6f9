"""sample on the NPU: ``npu_top_k_top_p`` filters, then exponential-race sampling (no host sync)."""
from __future__ import annotations

import torch

from backends.npu.runtime import device, torch_npu

MAX_FUSED_TOP_K = 1024  # npu_top_k_top_p accepts k in [1, 1024]


def sample_npu(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    """logits `[B, V]` float32 (any device) -> token ids `[B]` int64 on logits' device.

    temperature 0 is greedy. Otherwise logits/temperature are filtered by top_k (0 = all) and
    top_p (1.0 = all) with ``npu_top_k_top_p`` (top-p on the top-k-renormalised distribution),
    and one token per row is drawn as argmax(probs / E) with E ~ Exp(1) drawn on the CPU from
    ``generator`` (deterministic for a seeded generator). top_k > 1024 is applied in torch."""
    home = logits.device
    if temperature == 0:
        return logits.float().argmax(dim=-1)
    x = logits.float().to(device()) / temperature
    batch, vocab = x.shape
    k = None
    if 0 < top_k < vocab:
        if top_k <= MAX_FUSED_TOP_K:
            k = torch.full((batch,), top_k, dtype=torch.int32, device=x.device)
        else:
            kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
    p = torch.full((batch,), top_p, dtype=x.dtype, device=x.device) if top_p < 1.0 else None
    if k is not None or p is not None:
        x = torch_npu().npu_top_k_top_p(x, p=p, k=k)
    probs = torch.softmax(x, dim=-1)
    noise = torch.empty(batch, vocab, dtype=torch.float32).exponential_(generator=generator).to(x.device)
    return (probs / noise).argmax(dim=-1).to(home)
