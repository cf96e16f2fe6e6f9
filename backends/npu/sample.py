"""sample on the NPU: ``npu_top_k_top_p`` filters, then exponential-race sampling with the noise
drawn on the device (no host sync, no host-to-device copy per token)."""
from __future__ import annotations

import weakref

import torch

from backends.npu.runtime import device, torch_npu

MAX_FUSED_TOP_K = 1024  # npu_top_k_top_p accepts k in [1, 1024]
_DEVICE_GENERATORS: "weakref.WeakKeyDictionary[torch.Generator, torch.Generator]" = weakref.WeakKeyDictionary()


def device_generator(generator: torch.Generator | None, on: torch.device) -> torch.Generator | None:
    """The generator the noise is drawn with on device ``on``: None (the device's default
    generator) when the request has none; the request's own when it is on ``on``; otherwise one
    device generator per request generator, seeded once from its seed (vLLM-Ascend keeps
    per-request generators only for seeded requests, the same way)."""
    if generator is None or generator.device == on:
        return generator
    if generator not in _DEVICE_GENERATORS:
        mirror = torch.Generator(device=on)
        mirror.manual_seed(generator.initial_seed())
        _DEVICE_GENERATORS[generator] = mirror
    return _DEVICE_GENERATORS[generator]


def sample_npu(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    """logits `[B, V]` float32 (any device) -> token ids `[B]` int64 on logits' device.

    temperature 0 is greedy. Otherwise logits/temperature are filtered by top_k (0 = all) and
    top_p (1.0 = all) with ``npu_top_k_top_p`` (top-p on the top-k-renormalised distribution),
    and one token per row is drawn as argmax(probs / E) with E ~ Exp(1) drawn on the NPU from
    :func:`device_generator` (deterministic for a seeded generator). top_k > 1024 is applied in
    torch."""
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
    noise = torch.empty_like(probs).exponential_(generator=device_generator(generator, probs.device))
    return (probs / noise).argmax(dim=-1).to(home)
