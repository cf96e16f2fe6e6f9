"""GPTQ int4 checkpoints (AutoGPTQ layout; MiniCPM4-*-GPTQ-format, research/minicpm4_spec.md §6.2):
each quantized linear stores ``qweight`` int32 `[K/8, N]` (8 nibbles per int32 along the input
dim, low nibble first), ``qzeros`` int32 `[G, N/8]` (packed along the output dim), ``scales``
`[G, N]` and ``g_idx`` int32 `[K]` (the group of each input row), G = K / group_size.

    w[n, k] = scales[g, n] * (q[k, n] - (z[g, n] + offset)),  g = g_idx[k]

``offset`` is 1 for ``checkpoint_format`` "gptq" (AutoGPTQ v1 stores zero - 1) and 0 for
"gptq_v2". That convention is AutoGPTQ's and is UNVERIFIED against the released MiniCPM repos.
The loader dequantizes at load time into the model dtype: GPTQ checkpoints load and run on every
backend, without the memory or speed benefit of int4 kernels (none yet).
"""
from __future__ import annotations

import torch

PARTS = ("qweight", "qzeros", "scales", "g_idx")


_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble i of an int32 sits at bits 4i .. 4i+3


def _unpack(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> their 8 nibbles each, low first, laid out along ``dim`` (8x longer)."""
    shape = [1, 1, 1]
    shape[dim + 1] = 8
    nibbles = (packed.unsqueeze(dim + 1) >> _SHIFTS.view(shape)) & 0xF
    return nibbles.flatten(dim, dim + 1)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 `[K/8, N]` -> int `[K, N]` nibbles (row k = bits 4*(k % 8) of packed row k // 8)."""
    return _unpack(packed, 0)


def unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 `[G, N/8]` -> int `[G, N]` nibbles (column n = bits 4*(n % 8) of packed column n // 8)."""
    return _unpack(packed, 1)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               offset: int) -> torch.Tensor:
    """The float32 weight `[N, K]` (nn.Linear layout) of one GPTQ linear."""
    q = unpack_rows(qweight.to(torch.int32)).float()  # [K, N]
    groups = g_idx.long()
    zeros = (unpack_cols(qzeros.to(torch.int32)) + offset).float()[groups]  # [K, N]
    return ((q - zeros) * scales.float()[groups]).t().contiguous()


def _pack(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Nibbles -> int32 words: 8 consecutive values along ``dim`` per word, low first (the
    inverse of :func:`_unpack`)."""
    shape = list(values.shape)
    shape[dim:dim + 1] = [shape[dim] // 8, 8]
    v = values.to(torch.int64).reshape(shape)
    packed = (v << _SHIFTS.to(torch.int64).view([8] + [1] * (v.dim() - dim - 2))).sum(dim + 1)
    return (packed - ((packed >= 2 ** 31).to(torch.int64) << 32)).to(torch.int32)


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """int `[K, N]` nibbles -> int32 `[K/8, N]` (the inverse of :func:`unpack_rows`)."""
    return _pack(values, 0)


def pack_cols(values: torch.Tensor) -> torch.Tensor:
    """int `[G, N]` nibbles -> int32 `[G, N/8]` (the inverse of :func:`unpack_cols`)."""
    return _pack(values, 1)


def quantize(weight: torch.Tensor, group_size: int, offset: int = 1) -> dict[str, torch.Tensor]:
    """Symmetric 4-bit GPTQ tensors of ``weight`` `[N, K]` (round to nearest, for synthetic
    checkpoints): scale = max|w| / 7 per (group, output), zero 8. group_size -1: one group."""
    n, k = weight.shape
    group_size = k if group_size < 0 else group_size
    groups = weight.float().t().reshape(k // group_size, group_size, n)  # [G, gs, N]
    scales = (groups.abs().amax(dim=1) / 7).clamp(min=1e-8)  # [G, N]
    q = (groups / scales[:, None]).round().clamp(-8, 7) + 8
    zeros = torch.full((k // group_size, n), 8 - offset, dtype=torch.int64)
    return {"qweight": pack_rows(q.reshape(k, n)).contiguous(), "qzeros": pack_cols(zeros).contiguous(),
            "scales": scales.half().contiguous(), "g_idx": (torch.arange(k) // group_size).to(torch.int32)}
