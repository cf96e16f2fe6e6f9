"""CPU backend: registers the float32 reference (``name="reference"``, the judge) and the
everyday torch implementations of every catalogue op. Imports nothing heavy."""
from __future__ import annotations

from hal.registry import Impl, register

_OPS = ("embedding", "rms_norm", "add_rms_norm", "rotary", "swiglu", "linear", "logits",
        "attention_prefill", "attention_decode", "kv_write", "sample")
_REFERENCE_MODULE = {
    "logits": "linear",
    "add_rms_norm": "rms_norm",
    "attention_prefill": "attention",
    "attention_decode": "attention",
    "kv_write": "kv_cache",
}

for _op in _OPS:
    _module = _REFERENCE_MODULE.get(_op, _op)
    register(Impl(op=_op, backend="cpu", name="torch", fn=f"backends.cpu.ops:{_op}_cpu", priority=0))
    register(Impl(op=_op, backend="cpu", name="reference",
                  fn=f"backends.cpu.reference.{_module}:{_op}_ref", priority=100))
