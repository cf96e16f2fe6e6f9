"""Weight-only quantized linears on the NPU.

``linear_int4`` / ``linear_int8`` (``npu.torch_npu``): ``npu_weight_quant_batchmatmul``, which
computes ``x @ ((weight + antiquant_offset) * antiquant_scale)`` with a `(K, N)` weight.
:func:`prepare_weight_quant` maps a ``hal.quant`` container onto that formula once at bind time:

- int4 codes q in [0, 15] become the signed values ``q - 8`` in [-8, 7], packed by
  ``npu_convert_weight_to_int4pack`` (int32 `(K, N)` -> `(K, N / 8)`, eight per word along N);
  ``w = s * (q - z) + m = s * ((q - 8) + (8 - z + m / s))``, so ``antiquant_offset = 8 - z + m / s``
  per group: ``-(z - 8)``, the zero point **negated** after the same shift as the weights (a GPTQ
  checkpoint's zero z = stored + 1, or stored for gptq_v2), ``8 + m / s`` for Q4_1 (z = 0), and
  no offset at all where it is 0 everywhere (Q4_0, symmetric GPTQ: z = 8).
- int8: the values themselves, `(K, N)`, no offset.
- scales `(G, N)` with ``antiquant_group_size`` = the group size, or `(N,)` per channel when one
  group spans K. The op takes scale and offset in x's dtype only (float16 / bfloat16): bfloat16
  rounds each scale (and Q4_1's offset) to 8 significant bits; measured (``benchmarks/quant_nmse.py``,
  numbers in backends/npu/README.md "Known limits"), Q4_1 then has 3-4x the output error of the
  dense bfloat16 weights, 5x inside the op's bfloat16 tolerance; the other formats within 1.7x.

``linear_ternary`` (``npu.torch_unpack``): torch_npu has no 2-bit op; the 2-bit codes stay packed
on the device and each call unpacks them to x's dtype there (shifts and masks), scales them, and
runs the dense matmul: memory of 2 bits per weight at rest, the speed of a dense linear plus the
unpacking.

The emulator (``backends/npu/emulator/quant_matmul.py``) implements the documented rules and
refuses what the card refuses; what is unverified on hardware is listed in backends/npu/README.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backends.npu.runtime import torch_npu
from hal import quant
from hal.errors import UnsupportedOpError
from hal.probing import torch_device

MAX_DIM = 65535
X_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True, eq=False)
class WeightQuantLinear:
    """What ``npu_weight_quant_batchmatmul`` receives for one weight: ``weight`` int8 `(K, N)` or
    int32 `(K, N / 8)` (int4 packed), ``scale`` / ``offset`` (offset may be None) `(G, N)` or `(N,)`
    in x's dtype, ``group_size`` 0 for per channel."""

    op: str
    out_features: int
    in_features: int
    weight: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    group_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale, self.offset) if t is not None)


@dataclass(frozen=True, eq=False)
class PackedTernary:
    """Ternary codes kept packed on the device: ``packed`` uint8 `[O, K/4]` (``hal.quant`` layout),
    ``scales`` float32 `[O, G]`."""

    out_features: int
    in_features: int
    group_size: int
    packed: torch.Tensor
    scales: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales.numel() * self.scales.element_size()


def group_reason(op: str, group: int, k: int) -> str | None:
    """Why ``npu_weight_quant_batchmatmul`` cannot take groups of ``group`` over K = ``k``."""
    if group == k or (32 <= group <= k - 1 and group % 32 == 0):
        return None
    return (f"npu.{op}: group_size must be K (per channel) or a multiple of 32 in [32, K-1] "
            f"(npu_weight_quant_batchmatmul), got {group} for K={k}")


def unsupported_reason(weight: quant.QuantizedWeight, dtype: torch.dtype) -> str | None:
    """Why the fused op cannot take ``weight`` with activations of ``dtype`` (None when it can)."""
    op, n, k = weight.op, weight.out_features, weight.in_features
    if dtype not in X_DTYPES:
        return f"npu.{op}: dtype must be bfloat16 or float16 (npu_weight_quant_batchmatmul), got {dtype}"
    if not (1 <= k <= MAX_DIM and 1 <= n <= MAX_DIM):
        return f"npu.{op}: K and N must be in [1, {MAX_DIM}], got K={k}, N={n} ({weight.name})"
    if isinstance(weight, quant.Int4Weight) and n % 8:
        return (f"npu.{op}: out_features must be a multiple of 8 (npu_convert_weight_to_int4pack packs "
                f"along N), got {n} ({weight.name})")
    reason = group_reason(op, weight.group_size, k)
    return None if reason is None else f"{reason} ({weight.name})"


def antiquant_offset(weight: quant.Int4Weight) -> torch.Tensor:
    """float32 `[O, G]`: the offset that makes ``((q - 8) + offset) * s`` the container's
    ``s * (q - z) (+ m)``: ``8 - z (+ m / s)``."""
    offset = 8.0 - weight.zeros
    return offset if weight.mins is None else offset + weight.mins / weight.scales


def _layout(t: torch.Tensor, per_channel: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """float32 `[O, G]` -> `(G, O)` (or `(O,)` per channel) in ``dtype`` on ``device``."""
    out = t[:, 0] if per_channel else t.t()
    return out.contiguous().to(device=device, dtype=dtype)


def prepare_weight_quant(weight: quant.QuantizedWeight, ctx) -> WeightQuantLinear:
    """An ``Int4Weight`` / ``Int8Weight`` -> :class:`WeightQuantLinear` on the NPU (layout above).
    Raises UnsupportedOpError naming the tensor for what the op refuses."""
    reason = unsupported_reason(weight, ctx.dtype)
    if reason is not None:
        raise UnsupportedOpError(reason)
    device = torch_device(ctx.device)
    per_channel = weight.group_size == weight.in_features
    offset = None
    if isinstance(weight, quant.Int4Weight):
        signed = (weight.values().to(torch.int32) - 8).t().contiguous().to(device)
        packed = torch_npu().npu_convert_weight_to_int4pack(signed)
        raw = antiquant_offset(weight)
        if bool((raw != 0).any()):
            offset = _layout(raw, per_channel, ctx.dtype, device)
    elif isinstance(weight, quant.Int8Weight):
        packed = weight.q.t().contiguous().to(device)
    else:
        raise UnsupportedOpError(f"npu.{weight.op}: npu_weight_quant_batchmatmul takes int4 or int8, "
                                 f"got {type(weight).__name__} ({weight.name})")
    return WeightQuantLinear(weight.op, weight.out_features, weight.in_features, packed,
                             _layout(weight.scales, per_channel, ctx.dtype, device), offset,
                             0 if per_channel else weight.group_size)


def linear_weight_quant_npu(x: torch.Tensor, weight: WeightQuantLinear) -> torch.Tensor:
    """x `[..., K]` (float16 / bfloat16) @ the prepared weight -> `[..., N]` in x.dtype."""
    x2 = x.reshape(-1, weight.in_features)
    y = torch_npu().npu_weight_quant_batchmatmul(x2, weight.weight, weight.scale, weight.offset,
                                                 antiquant_group_size=weight.group_size)
    return y.reshape(*x.shape[:-1], weight.out_features)


def prepare_packed_ternary(weight: quant.TernaryWeight, ctx) -> PackedTernary:
    """The container's packed codes and float32 scales moved to the NPU as they are."""
    device = torch_device(ctx.device)
    return PackedTernary(weight.out_features, weight.in_features, weight.group_size,
                         weight.packed.to(device), weight.scales.to(device))


def unpack_ternary_on_device(weight: PackedTernary, dtype: torch.dtype) -> torch.Tensor:
    """`[O, K]` in ``dtype``: ``scales * t`` with t from the 2-bit codes (``hal.quant`` layout)."""
    codes = torch.stack([(weight.packed >> (2 * i)) & 3 for i in range(4)], dim=-1).flatten(-2)
    # t in {-1, 0, 1} is exact in any dtype, so this is the float32 s * t rounded once, without a
    # float32 [O, K] temporary
    return (codes.to(dtype) - 1) * weight.scales.to(dtype).repeat_interleave(weight.group_size, dim=1)


def linear_ternary_npu(x: torch.Tensor, weight: PackedTernary) -> torch.Tensor:
    """x `[..., K]` @ the unpacked weight `[O, K]`.T -> `[..., O]` in x.dtype."""
    return F.linear(x, unpack_ternary_on_device(weight, x.dtype))
