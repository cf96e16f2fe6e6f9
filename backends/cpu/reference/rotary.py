from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, T, heads, D]` float32; cos/sin `[B, T, D]`. NeoX pairs (i, i + D/2)."""
    half = x.shape[-1] // 2
    out = torch.empty_like(x)
    c = cos[:, :, None, :]
    s = sin[:, :, None, :]
    for i in range(half):
        j = i + half
        # (x_i, x_j) rotated by angle_i; rotate_half(x) = (-x_j, x_i)
        out[..., i] = x[..., i] * c[..., i] - x[..., j] * s[..., i]
        out[..., j] = x[..., j] * c[..., j] + x[..., i] * s[..., j]
    return out


def rotary_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[B, T, H, D]`, k `[B, T, Hk, D]`, cos/sin `[B, T, D]` float32 -> (q', k') in input dtypes."""
    cos = cos.float()
    sin = sin.float()
    return _rotate(q.float(), cos, sin).to(q.dtype), _rotate(k.float(), cos, sin).to(k.dtype)
