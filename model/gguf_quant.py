"""GGUF tensors of types Q4_0, Q4_1 and Q8_0 as ``hal.quant`` containers, kept quantized.

Block layouts (``gguf.GGML_QUANT_SIZES``: 32 values per block), as the ``gguf`` package's numpy
dequantizers (``gguf.quants.Q4_0`` / ``Q4_1`` / ``Q8_0.dequantize_blocks``) read them:

``Q4_0`` 18 bytes: ``d`` float16, 16 bytes of nibbles;   ``w = d * (q - 8)``
``Q4_1`` 20 bytes: ``d``, ``m`` float16, 16 bytes;        ``w = d * q + m``
``Q8_0`` 34 bytes: ``d`` float16, 32 int8;                ``w = q * d``

A Q4 block's value ``j < 16`` is the low nibble of byte ``j``, value ``j + 16`` its high nibble
(``hal.quant.pack_int4`` pairs adjacent values instead: the codes are repacked). Each
container's ``dequantize()`` evaluates the same float32 operations, so it equals
``gguf.quants.dequantize`` bit for bit (tests/test_quant_gguf.py). Other types are decoded at load
(and named: ``model.checkpoint.DecodedAtLoad``).
"""
from __future__ import annotations

import numpy as np
import torch

from hal import quant
from hal.errors import CheckpointError

BLOCK = 32
KEPT = ("Q4_0", "Q4_1", "Q8_0")
"""The GGUF types a linear stays quantized in (the rest dequantize at load)."""


def _half(raw: np.ndarray) -> torch.Tensor:
    """uint8 `[rows, blocks, 2]` -> float32 `[rows, blocks]` (float16 bytes, exact upcast)."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def _repack_q4(raw: np.ndarray) -> torch.Tensor:
    """uint8 `[rows, blocks, 16]` GGUF Q4 bytes -> ``hal.quant`` packed uint8 `[rows, blocks * 16]`.

    Ours pairs values 2j, 2j+1 in byte j. For j < 8 they are the low nibbles of GGUF bytes 2j and
    2j+1; for j >= 8 (values 16..31) the high nibbles of bytes 2j-16 and 2j-15."""
    even, odd = raw[..., 0::2], raw[..., 1::2]
    low = (even & 0xF) | ((odd & 0xF) << 4)
    high = (even >> 4) | (odd & 0xF0)
    return torch.from_numpy(np.concatenate([low, high], axis=-1).reshape(raw.shape[0], -1))


def container(path, name: str, kind: str, blocks: np.ndarray, shape: tuple[int, int]) -> quant.QuantizedWeight:
    """The container of a GGUF tensor ``name`` of type ``kind`` (one of :data:`KEPT`): ``blocks``
    its bytes uint8 `[rows, bytes per row]`, ``shape`` its torch shape `[O, K]`."""
    import gguf

    rows, k = shape
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    if block != BLOCK or k % block or blocks.shape != (rows, k // block * size):
        raise CheckpointError(f"{path}: tensor '{name}' ({kind}) holds {list(blocks.shape)} bytes, expected "
                              f"{[rows, k // BLOCK * size]} for shape {list(shape)}")
    raw = blocks.reshape(rows, k // block, size)
    common = {"name": name, "source": kind.lower(), "out_features": rows, "in_features": k, "group_size": block,
              "scales": _half(raw[..., 0:2])}
    if kind == "Q8_0":
        q = torch.from_numpy(np.ascontiguousarray(raw[..., 2:]).view(np.int8).reshape(rows, k))
        return quant.Int8Weight(**common, q=q)
    if kind == "Q4_0":
        return quant.Int4Weight(**common, packed=_repack_q4(raw[..., 2:]),
                                zeros=torch.full((rows, k // block), 8.0))
    return quant.Int4Weight(**common, packed=_repack_q4(raw[..., 4:]),
                            zeros=torch.zeros(rows, k // block), mins=_half(raw[..., 2:4]))
