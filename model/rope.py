"""Rotary position tables with MiniCPM's LongRoPE, exactly as the remote ``MiniCPMLongRoPE``.

    inv_freq[j] = 1 / (ext[j] * theta^(2j/D)),  j = 0 .. D/2-1
    ext         = long_factor if max_position_embeddings > original_max_position_embeddings
                  else short_factor        (chosen once per model, for every position)
    mscale      = sqrt(1 + ln(s) / ln(original_max_position_embeddings)), s = max_pos / original,
                  1.0 when s <= 1
    cos, sin    = cos(emb), sin(emb),  emb = cat(t * inv_freq, t * inv_freq)

The remote code multiplies cos and sin by mscale; here the tables stay unscaled (every value in
[-1, 1], the documented range of ``npu_rotary_mul``'s r1/r2) and the model applies mscale outside
the rotary op, as ``mscale**2`` in every scale that multiplies a rotated q.k product (attention,
InfLLM-v2 block selection, lightning attention; see :attr:`RopeTable.qk_scale`): rotating q and k
by mscale-scaled tables multiplies each q.k by exactly mscale**2, and nothing else reads rotated
q or k. The remote code builds its cache at length max_position_embeddings, so the factor set
follows that length, not the request's. Tables are float32 and grow on demand.
"""
from __future__ import annotations

import math

import torch

from model.config import MiniCPMConfig


def rope_parameters(config: MiniCPMConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq `[D/2]` float32, mscale)."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    original = scaling.original_max_position_embeddings
    use_long = config.max_position_embeddings > original
    ext = torch.tensor(scaling.long_factor if use_long else scaling.short_factor, dtype=torch.float32)
    scale = config.max_position_embeddings / original
    mscale = 1.0 if scale <= 1.0 else math.sqrt(1.0 + math.log(scale) / math.log(original))
    return inv_freq / ext, mscale


class RopeTable:
    """cos/sin lookup for absolute positions: ``table(positions [B, T]) -> (cos, sin) [B, T, D]``,
    unscaled (|value| <= 1); LongRoPE's mscale is :attr:`mscale`."""

    def __init__(self, config: MiniCPMConfig, device: torch.device):
        self.inv_freq, self.mscale = rope_parameters(config)
        self.device = device
        self.limit = config.max_position_embeddings
        self._cos = torch.empty(0, config.head_dim, device=device)
        self._sin = torch.empty(0, config.head_dim, device=device)

    def _grow(self, length: int) -> None:
        length = min(max(length, 2 * self._cos.shape[0], 256), max(self.limit, length))
        t = torch.arange(length, dtype=torch.int64).float()
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = emb.cos().to(self.device)
        self._sin = emb.sin().to(self.device)

    @property
    def qk_scale(self) -> float:
        """mscale**2: the factor LongRoPE's mscale puts on every rotated q.k product."""
        return self.mscale * self.mscale

    def ensure(self, length: int) -> None:
        """Make positions ``0 .. length-1`` available to :meth:`lookup`."""
        if length > self._cos.shape[0]:
            self._grow(length)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows of ``positions`` (already covered by :meth:`ensure`); no host read, so a
        device graph can capture it."""
        return self._cos[positions], self._sin[positions]

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.ensure(int(positions.max()) + 1 if positions.numel() else 0)
        return self.lookup(positions)
