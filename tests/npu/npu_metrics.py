"""The one comparison the NPU tests use: NMSE against the float32 reference with the catalogue's
tolerance (``hal/ops.py``), after NaN and inf checks."""
from __future__ import annotations

import torch

from hal.ops import get_spec


def nmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    """sum((ref - out)^2) / sum(ref^2) in float64 (0 when both are all zeros)."""
    r, o = ref.double(), out.double()
    denom = float((r * r).sum())
    err = float(((r - o) ** 2).sum())
    return err / denom if denom else err


def mismatch(op: str, name: str, ref: torch.Tensor, out: torch.Tensor, dtype: str,
             case: str = "") -> str | None:
    """None when output ``name`` matches ``ref`` within the op's NMSE tolerance for that output and
    ``dtype``, else why not (``case`` labels the message)."""
    tol = get_spec(op).tolerance(dtype, name)
    name = f"{name} {case}".rstrip()
    if tuple(ref.shape) != tuple(out.shape):
        return f"[{op}] {name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if bool(torch.isnan(out).any()) != bool(torch.isnan(ref).any()):
        return f"[{op}] {name}: NaN in {'output' if torch.isnan(out).any() else 'reference'} only"
    err = nmse(torch.nan_to_num(ref.float()), torch.nan_to_num(out.float()))
    if err > tol:
        max_abs = float((ref.float() - out.float()).abs().nan_to_num().max())
        return f"[{op}] {name}: NMSE {err:.3e} > {tol:.0e} (max_abs {max_abs:.3e}) {dtype}"
    return None


def assert_close(op: str, name: str, ref: torch.Tensor, out: torch.Tensor, dtype: str,
                 case: str = "") -> None:
    why = mismatch(op, name, ref, out, dtype, case)
    assert why is None, why
