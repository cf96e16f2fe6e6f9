"""Emulated ``npu_weight_quant_batchmatmul`` and ``npu_convert_weight_to_int4pack`` (torch_npu
2.13 / 2.14 schemas; Atlas A2 / A3 rules of the op-plugin docs
``docs/zh/custom_APIs/torch_npu/torch_npu-npu_weight_quant_batchmatmul.md`` and
``torch_npu-npu_convert_weight_to_int4pack.md``).

Weight-only ("pseudo-quantized") matmul, the documented formula::

    ANTIQUANT(weight) = (weight + antiquant_offset) * antiquant_scale
    y = x @ ANTIQUANT(weight) + bias

evaluated as the op's own test golden does (op-plugin ``test_npu_convert_weight_to_int4pack.py``):
the antiquantized weight in x's dtype (each of the add and the multiply rounded to it: the cube
unit multiplies float16 / bfloat16 operands), the product accumulated in float32, y in x's dtype.

int4 packing (``npu_convert_weight_to_int4pack``): eight int4 values per int32 along the last
dim, element ``8j + i`` in bits ``4i .. 4i+3`` of word j (two's-complement nibbles), as CANN's
host code packs them (hicann/ops-nn ``aclnn_convert_weight_to_int4_pack.cpp``: byte i holds
elements 2i (low nibble) and 2i+1 (high nibble); the words are little-endian).
"""
from __future__ import annotations

import torch

from backends.npu.emulator.checks import not_emulated, require, require_contiguous, require_dtype
from backends.npu.emulator.graphs import aclnn_op

MAX_DIM = 65535  # K and N are in [1, 65535]
X_DTYPES = (torch.float16, torch.bfloat16)


@aclnn_op
def npu_convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
    """int32 `(d0, d1)` with values in [-8, 7], contiguous, d1 a multiple of 8 -> int32 `(d0, d1 / 8)`."""
    op = "npu_convert_weight_to_int4pack"
    require_dtype(op, "weight", weight, (torch.int32,))
    require(weight.dim() == 2, op, f"weight must have 2 dims, got {weight.dim()}")
    require_contiguous(op, "weight", weight)
    require(weight.shape[1] % 8 == 0, op, f"the last dim of weight must be a multiple of 8, got {weight.shape[1]}")
    require(weight.numel() > 0, op, "weight must not be empty")
    require(bool(((weight >= -8) & (weight <= 7)).all()), op, "weight values must lie in the int4 range [-8, 7]")
    require(inner_k_tiles == 0, op, f"inner_k_tiles is reserved (0), got {inner_k_tiles}")
    words = torch.zeros(weight.shape[0], weight.shape[1] // 8, dtype=torch.int64)
    for i in range(8):
        words |= (weight[:, i::8].to(torch.int64) & 0xF) << (4 * i)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_int4pack(packed: torch.Tensor) -> torch.Tensor:
    """int32 `(d0, d1 / 8)` -> int32 `(d0, d1)` in [-8, 7]: the inverse of the packing above."""
    nibbles = (packed[..., None] >> (4 * torch.arange(8, dtype=torch.int32))) & 0xF  # arithmetic shift, masked
    return ((nibbles ^ 8) - 8).flatten(-2)  # two's-complement nibble -> [-8, 7]


def _weight_values(op: str, weight: torch.Tensor, k: int) -> torch.Tensor:
    """The (K, N) integer weight the op dequantizes: int8 as given (any strides), int32 packed int4
    either contiguous `(K, N / 8)` or the transposed view of a packed `(N, K / 8)`."""
    require_dtype(op, "weight", weight, (torch.int8, torch.int32))
    require(weight.dim() == 2, op, f"weight must have 2 dims (K, N), got {weight.dim()}")
    if weight.dtype == torch.int8:
        return weight.to(torch.int32)
    if weight.is_contiguous() and weight.shape[0] == k:
        return unpack_int4pack(weight)
    if weight.t().is_contiguous() and weight.shape[0] * 8 == k:
        return unpack_int4pack(weight.t()).t()
    raise not_emulated(op, f"an int32 (int4) weight of shape {tuple(weight.shape)} and strides "
                           f"{tuple(weight.stride())} for K = {k}")


def _mode(op: str, scale: torch.Tensor, k: int, n: int, group: int) -> tuple[str, int]:
    """('tensor' | 'channel' | 'group', rows per scale row) from antiquant_scale's shape."""
    shape = tuple(scale.shape)
    if shape in ((1,), (1, 1)):
        return "tensor", k
    if shape in ((n,), (1, n)):
        return "channel", k
    require(32 <= group <= k - 1 and group % 32 == 0, op,
            f"antiquant_group_size must be in [32, K-1] = [32, {k - 1}] and a multiple of 32 for a per-group "
            f"antiquant_scale {list(shape)}, got {group}")
    groups = -(-k // group)
    require(shape == (groups, n), op, f"antiquant_scale must be (1,), (N,) = ({n},) or (ceil(K / group), N) = "
                                      f"({groups}, {n}), got {list(shape)}")
    return "group", group


def _expand(t: torch.Tensor, mode: str, rows: int, k: int, n: int) -> torch.Tensor:
    """A scale / offset of ``mode`` -> `(K, N)`."""
    if mode == "group":
        return t.repeat_interleave(rows, dim=0)[:k]
    return t.reshape(1, -1).expand(k, n)


@aclnn_op
def npu_weight_quant_batchmatmul(x: torch.Tensor, weight: torch.Tensor, antiquant_scale: torch.Tensor,
                                 antiquant_offset: torch.Tensor | None = None, quant_scale: torch.Tensor | None = None,
                                 quant_offset: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                                 antiquant_group_size: int = 0, inner_precise: int = 0,
                                 weight_dtype: int | None = None) -> torch.Tensor:
    """x `(M, K)` float16 / bfloat16 @ ((weight + antiquant_offset) * antiquant_scale) `(K, N)` + bias
    -> `(M, N)` in x.dtype.

    weight: int8 `(K, N)` or int32 packed int4 (see :func:`_weight_values`). antiquant_scale:
    x's dtype; `(1,)` per tensor, `(N,)` / `(1, N)` per channel, `(ceil(K / g), N)` per group with
    ``antiquant_group_size`` g in [32, K-1], a multiple of 32. antiquant_offset: the scale's shape
    and dtype. bias: `(N,)` / `(1, N)`, float32 for bfloat16 x, float16 for float16 x. K, N in
    [1, 65535]. Not emulated: int64 scales (``npu_trans_quant_param``), output quantization
    (quant_scale / quant_offset), ``weight_dtype``, FRACTAL_NZ weights."""
    op = "npu_weight_quant_batchmatmul"
    require_dtype(op, "x", x, X_DTYPES)
    require(x.dim() == 2, op, f"x must have 2 dims (M, K), got {x.dim()}")
    require(x.numel() > 0, op, "x must not be empty")
    if antiquant_scale.dtype == torch.int64:
        raise not_emulated(op, "an int64 antiquant_scale (npu_trans_quant_param)")
    if quant_scale is not None or quant_offset is not None:
        raise not_emulated(op, "output quantization (quant_scale / quant_offset)")
    if weight_dtype is not None:
        raise not_emulated(op, "weight_dtype")
    require(inner_precise in (0, 1), op, f"inner_precise must be 0 or 1, got {inner_precise}")
    k = x.shape[1]
    values = _weight_values(op, weight, k)
    require(values.shape[0] == k, op, f"weight K {values.shape[0]} must equal x's K {k}")
    n = values.shape[1]
    require(1 <= k <= MAX_DIM and 1 <= n <= MAX_DIM, op, f"K and N must be in [1, {MAX_DIM}], got K={k}, N={n}")
    require(antiquant_scale.dtype == x.dtype, op,
            f"antiquant_scale dtype must equal x's ({str(x.dtype).removeprefix('torch.')}), got "
            f"{str(antiquant_scale.dtype).removeprefix('torch.')}")
    mode, rows = _mode(op, antiquant_scale, k, n, antiquant_group_size)
    w = values.to(x.dtype)
    if antiquant_offset is not None:
        require(antiquant_offset.dtype == antiquant_scale.dtype, op,
                f"antiquant_offset dtype must equal antiquant_scale's, got "
                f"{str(antiquant_offset.dtype).removeprefix('torch.')}")
        require(tuple(antiquant_offset.shape) == tuple(antiquant_scale.shape), op,
                f"antiquant_offset shape must equal antiquant_scale's {list(antiquant_scale.shape)}, got "
                f"{list(antiquant_offset.shape)}")
        w = w + _expand(antiquant_offset, mode, rows, k, n)
    w = w * _expand(antiquant_scale, mode, rows, k, n)
    y = x.float() @ w.float()
    if bias is not None:
        want = torch.float32 if x.dtype == torch.bfloat16 else torch.float16
        require(bias.dtype == want, op, f"bias must be {str(want).removeprefix('torch.')} for "
                                        f"{str(x.dtype).removeprefix('torch.')} x, got {str(bias.dtype).removeprefix('torch.')}")
        require(tuple(bias.shape) in ((n,), (1, n)), op, f"bias must be (N,) or (1, N) with N={n}, got {list(bias.shape)}")
        y = y + bias.float().reshape(1, n)
    return y.to(x.dtype)
