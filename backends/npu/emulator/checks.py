"""Argument checks shared by the emulated torch_npu ops.

The real ops reject bad calls with a RuntimeError from the CANN kernel; the emulator raises
:class:`EmulatedOpError` (a RuntimeError) with a one-line message naming the op, the argument,
what is allowed and what it got, so a wrapper bug shows up here before it reaches hardware.
"""
from __future__ import annotations

from typing import Iterable

import torch


class EmulatedOpError(RuntimeError):
    """A call the real torch_npu op rejects (shape, dtype, layout, contiguity, range)."""


class NotEmulatedError(NotImplementedError):
    """A documented option of a real op that the emulator does not implement."""


def fail(op: str, message: str) -> EmulatedOpError:
    return EmulatedOpError(f"{op} (emulated torch_npu): {message}")


def require(condition: bool, op: str, message: str) -> None:
    if not condition:
        raise fail(op, message)


def require_dtype(op: str, name: str, t: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise fail(op, f"{name} dtype must be one of ({names}), got {str(t.dtype).removeprefix('torch.')}")


def require_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    require(t.is_contiguous(), op, f"{name} must be contiguous, got strides {tuple(t.stride())}")


def not_emulated(op: str, what: str) -> NotEmulatedError:
    return NotEmulatedError(f"{op} (emulated torch_npu): {what} is not emulated")
