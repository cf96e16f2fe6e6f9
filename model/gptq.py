"""GPTQ int4 checkpoints (AutoGPTQ layout; MiniCPM4-*-GPTQ-format, research/minicpm4_spec.md §6.2):
each quantized linear stores ``qweight`` int32 `[K/8, N]` (8 nibbles per int32 along the input
dim, low nibble first), ``qzeros`` int32 `[G, N/8]` (packed along the output dim), ``scales``
`[G, N]` and ``g_idx`` int32 `[K]` (the group of each input row), G = K / group_size.

    w[n, k] = scales[g, n] * (q[k, n] - (z[g, n] + offset)),  g = g_idx[k]

``offset`` is 1 for ``checkpoint_format`` "gptq" (AutoGPTQ v1 stores zero - 1) and 0 for
"gptq_v2". That convention is AutoGPTQ's and is UNVERIFIED against the released MiniCPM repos.
The loader keeps each linear quantized as a ``hal.quant.Int4Weight`` (:func:`container`: the
same formula, evaluated as :func:`dequantize` does) when ``g_idx`` is the plain ``k // group_size``
(desc_act false); ``quantize="dequantize"`` (or a reordered g_idx) decodes it into the model dtype.
"""
from __future__ import annotations

import torch

from hal import quant

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


def plain_groups(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when ``g_idx`` `[K]` is ``k // group_size`` (desc_act false: groups of consecutive rows)."""
    return torch.equal(g_idx.long(), torch.arange(g_idx.numel()) // group_size)


def container(name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
              offset: int) -> quant.Int4Weight:
    """One GPTQ linear (plain groups, see :func:`plain_groups`) as ``hal.quant.Int4Weight`` `[N, K]`:
    codes q, scales float32 (from float16: exact), zeros = stored zero + offset, no mins; its
    ``dequantize()`` equals :func:`dequantize` bit for bit (``s * (q - z)`` = ``(q - z) * s``)."""
    codes = unpack_rows(qweight.to(torch.int32)).t()  # [N, K]
    zeros = (unpack_cols(qzeros.to(torch.int32)) + offset).float().t().contiguous()  # [N, G]
    return quant.Int4Weight(name=name, source="gptq" if offset == 1 else "gptq_v2", out_features=codes.shape[0],
                            in_features=codes.shape[1], group_size=group_size,
                            scales=scales.float().t().contiguous(), packed=quant.pack_int4(codes), zeros=zeros)


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


def quantize(weight: torch.Tensor, group_size: int, offset: int = 1, sym: bool = True) -> dict[str, torch.Tensor]:
    """4-bit GPTQ tensors of ``weight`` `[N, K]` (round to nearest, for synthetic checkpoints and
    ``python -m model.quantize``). Symmetric: scale = max|w| / 7 per (group, output), zero 8.
    Asymmetric: scale = (max - min) / 15, zero = round(-min / scale) in 0..15. group_size -1:
    one group. The stored zero is zero - offset (AutoGPTQ v1: offset 1; a zero of 0 then stores -1,
    which packs as nibble 15 and reads back as 15 + 1: v1's known wrap, avoided by clamping to 1)."""
    n, k = weight.shape
    group_size = k if group_size < 0 else group_size
    groups = weight.float().t().reshape(k // group_size, group_size, n)  # [G, gs, N]
    if sym:
        scales = (groups.abs().amax(dim=1) / 7).clamp(min=1e-8)  # [G, N]
        zero = torch.full((k // group_size, n), 8, dtype=torch.int64)
    else:
        low, high = groups.amin(dim=1).clamp(max=0), groups.amax(dim=1).clamp(min=0)
        scales = ((high - low) / 15).clamp(min=1e-8)
        zero = (-low / scales).round().clamp(offset, 15).to(torch.int64)
        scales = scales.half().float()  # the stored float16 scale: the one the codes are rounded with
    q = (groups / scales[:, None]).round().add(zero[:, None]).clamp(0, 15)
    zeros = zero - offset
    return {"qweight": pack_rows(q.reshape(k, n)).contiguous(), "qzeros": pack_cols(zeros).contiguous(),
            "scales": scales.half().contiguous(), "g_idx": (torch.arange(k) // group_size).to(torch.int32)}
