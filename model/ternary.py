"""BitCPM4 ternary linears: detect fake-quantized weights and pack them into ``hal.quant.TernaryWeight``.

BitCPM4 checkpoints are ordinary dense checkpoints whose decoder linears take values in
``{-s, 0, +s}`` per row or per group of inputs (research/minicpm4_spec.md §6.1: "stored in a
fake-quantized format"; the granularity is unverified, so it is recovered from the values:
the largest group size, per row first, whose every group holds at most one nonzero magnitude).
Packed, a linear takes 2 bits per weight plus one float32 scale per group; its ``dequantize()``
is ``s * t`` = the stored value exactly (upcast to float32), so a packed model decodes to the
dense fake-quantized one bit for bit.

:func:`fake_quantize` is the quantizer of the same team's BitCPM-CANN report (per group
``s = max(mean|W_g|, eps)``, ``W_q = clamp(round(W_g / s), -1, 1) * s``), used by
``python -m model.quantize --format ternary`` to write BitCPM4's own format.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hal import quant
from hal.errors import CheckpointError

GROUP_CANDIDATES = (256, 128, 64, 32)
"""Group sizes tried after one group per row, largest first."""
EPS = 1e-5


def _magnitudes(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, bool]:
    """(scales float32 `[O, G]`, whether every group has at most one nonzero magnitude)."""
    out, k = weight.shape
    mags = weight.float().abs().reshape(out, k // group, group)
    scales = mags.amax(dim=-1)
    ok = bool(((mags == 0) | (mags == scales[..., None])).all())
    return scales, ok


def detect(weight: torch.Tensor) -> tuple[int, torch.Tensor] | None:
    """(group size, scales float32 `[O, G]`) when ``weight`` `[O, K]` is ternary per row or per
    group of :data:`GROUP_CANDIDATES` inputs (the largest that holds), else None."""
    k = weight.shape[1]
    for group in (k,) + tuple(g for g in GROUP_CANDIDATES if g < k and k % g == 0):
        scales, ok = _magnitudes(weight, group)
        if ok:
            return group, scales
    return None


def pack(name: str, weight: torch.Tensor, source: str = "bitcpm4") -> quant.TernaryWeight:
    """A fake-quantized ternary ``weight`` `[O, K]` -> :class:`hal.quant.TernaryWeight`. Raises
    CheckpointError naming ``name`` when it is not ternary (or K is not a multiple of 4)."""
    found = detect(weight)
    if found is None:
        raise CheckpointError(f"{name}: not a ternary weight (some row holds more than one nonzero magnitude "
                              f"per group for every group size tried: {weight.shape[1]}, "
                              f"{', '.join(map(str, GROUP_CANDIDATES))})")
    if weight.shape[1] % 4:
        raise CheckpointError(f"{name}: in_features {weight.shape[1]} must be a multiple of 4 to pack ternary")
    group, scales = found
    t = torch.sign(weight.float()).to(torch.int8)
    return quant.TernaryWeight(name=name, source=source, out_features=weight.shape[0], in_features=weight.shape[1],
                               group_size=group, scales=scales, packed=quant.pack_ternary(t))


def pack_linears(weights: dict, where: Path) -> dict:
    """``weights`` (a loader's mapping, fused names) with every dense decoder-layer linear packed;
    containers already quantized stay as they are. Raises CheckpointError naming the first
    linear that is not ternary (file ``where``)."""
    out = {}
    for name, tensor in weights.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight") and isinstance(tensor, torch.Tensor):
            try:
                tensor = pack(name, tensor)
            except CheckpointError as exc:
                raise CheckpointError(f"{where}: quantize='ternary': {exc}") from None
        out[name] = tensor
    return out


def fake_quantize(weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """BitCPM-CANN's ternary quantizer on ``weight`` `[O, K]`, in ``dtype`` (each group's scale
    rounded to ``dtype`` first, so the stored values are exactly ``{-s, 0, +s}``)."""
    out, k = weight.shape
    group = k if group_size < 0 else group_size
    groups = weight.float().reshape(out, k // group, group)
    scales = groups.abs().mean(dim=-1, keepdim=True).clamp(min=EPS).to(dtype).float()
    t = (groups / scales).round().clamp(-1, 1)
    return (t * scales).reshape(out, k).to(dtype)
