"""CUDA backend (Triton kernels). No kernels are registered yet: binding on ``cuda`` runs the
portable torch implementations below, which work on any torch device."""
from __future__ import annotations

from backends.cpu import CAPTURABLE, OPS, torch_fn
from hal.registry import Impl, register

for _op in OPS:
    register(Impl(op=_op, backend="cuda", name="torch", fn=torch_fn(_op), priority=50, capturable=_op in CAPTURABLE))
register(Impl(op="attention_decode", backend="cuda", name="torch_full",
              fn="backends.cpu.ops:attention_decode_full_cpu", priority=55, capturable=True))
