"""CPU backend: registers the float32 reference (``name="reference"``, the judge) and the
everyday torch implementations of every catalogue op. Imports nothing heavy.

``CAPTURABLE`` lists the torch implementations that never read tensor values on the host (they
can run inside a device graph when the CUDA backend borrows them); ``attention_decode`` has a
second, capturable implementation ``torch_full`` that reads the whole cache capacity.
InfLLM-v2 and lightning attention live in modules of their own (``infllm.py``, ``lightning.py``);
the fast decode step's variants (``cpu.decode``) in ``decode.py``."""
from __future__ import annotations

import importlib

from hal.registry import Impl, register

OPS = ("embedding", "rms_norm", "add_rms_norm", "rotary", "swiglu", "sigmoid_gate", "linear", "logits",
       "attention_prefill", "attention_decode", "kv_write", "infllm_compress_keys", "infllm_append_kernel",
       "infllm_select_blocks", "block_sparse_attention", "lightning_attention", "sample")
_REFERENCE_MODULE = {
    "logits": "linear",
    "add_rms_norm": "rms_norm",
    "attention_prefill": "attention",
    "attention_decode": "attention",
    "kv_write": "kv_cache",
    "infllm_compress_keys": "infllm",
    "infllm_append_kernel": "infllm",
    "infllm_select_blocks": "infllm",
    "block_sparse_attention": "infllm",
    "sigmoid_gate": "swiglu",
    "lightning_attention": "lightning",
}
TORCH_MODULE = {
    **{op: "backends.cpu.infllm" for op in ("infllm_compress_keys", "infllm_append_kernel", "infllm_select_blocks",
                                            "block_sparse_attention")},
    "lightning_attention": "backends.cpu.lightning",
}
"""Where each op's torch implementation lives (default ``backends.cpu.ops``)."""


def torch_fn(op: str) -> str:
    """``module:function`` of ``op``'s portable torch implementation (cuda and npu borrow it)."""
    return f"{TORCH_MODULE.get(op, 'backends.cpu.ops')}:{op}_cpu"


CAPTURABLE = frozenset(set(OPS) - {"attention_prefill", "attention_decode", "sample"})

TABLE_OPS = ("embedding", "logits")
"""Ops whose CPU implementations also take a token table kept quantized (a ``hal.quant`` container,
hal/ops.py "Quantized token tables"): their ``prepare`` makes its form (``backends/cpu/table.py``;
the reference: its dense decoding). Implementations without such a prepare (cuda, npu) receive the
table decoded at load."""

for _op in OPS:
    _module = _REFERENCE_MODULE.get(_op, _op)
    register(Impl(op=_op, backend="cpu", name="torch", fn=torch_fn(_op), priority=0,
                  capturable=_op in CAPTURABLE,
                  prepare="backends.cpu.table:prepare_table" if _op in TABLE_OPS else None))
    register(Impl(op=_op, backend="cpu", name="reference",
                  fn=f"backends.cpu.reference.{_module}:{_op}_ref", priority=100,
                  prepare="backends.cpu.reference.embedding:prepare_table_ref" if _op in TABLE_OPS else None))
register(Impl(op="attention_decode", backend="cpu", name="torch_full", fn="backends.cpu.ops:attention_decode_full_cpu",
              priority=5, capturable=True))


def _lazy_supports(module: str):
    """``module.supports``, imported on first call (torch-only modules: cheap, but kept off the import path)."""

    def supports(ctx):
        return importlib.import_module(module).supports(ctx)

    return supports


register(Impl(op="logits", backend="cpu", name="fbgemm", fn="backends.cpu.logits_fp16:logits_fp16",
              supports=_lazy_supports("backends.cpu.logits_fp16"), priority=-1, capturable=True,
              prepare="backends.cpu.logits_fp16:prepare_logits_fp16"))
"""bfloat16 / float16 lm_heads: packed once into fbgemm's exact float16 GEMM (``logits_fp16.py``);
float32 models take ``cpu.onednn``."""
register(Impl(op="logits", backend="cpu", name="onednn", fn="backends.cpu.logits_onednn:logits_onednn",
              supports=_lazy_supports("backends.cpu.logits_onednn"), priority=-1, capturable=True,
              prepare="backends.cpu.table:prepare_table"))
"""float32 lm_heads: oneDNN's inner product on the dense `[V, E]` table (``logits_onednn.py``), faster
than ``F.linear`` at one row (SmolLM2: 4.9 vs 8.6 ms on an AVX2 EPYC, 3.96 vs 4.18 on an AVX-512 Xeon);
``prefer={"logits": "cpu.torch"}`` keeps MKL's GEMM."""
register(Impl(op="linear", backend="cpu", name="onednn", fn="backends.cpu.linear_onednn:linear_onednn",
              supports=_lazy_supports("backends.cpu.linear_onednn"), priority=-2, capturable=True))
"""float32 dense linears on the checkpoint's `[O, K]` weights (``linear_onednn.py``): oneDNN eagerly, a
reduction inductor fuses when traced into the compiled decode layer; on CPUs below AVX-512 only (on
AVX-512 ``cpu.torch_kn`` measured faster and binds)."""
register(Impl(op="linear", backend="cpu", name="torch_kn", fn="backends.cpu.linear_kn:linear_kn",
              supports=_lazy_supports("backends.cpu.linear_kn"), priority=-1, capturable=True,
              prepare="backends.cpu.linear_kn:prepare_linear_kn"))
"""float32 dense linears held pre-transposed (`[K, O]` contiguous, ``linear_kn.py``): faster decode and prefill
products than ``F.linear``; ``prefer={"linear": "cpu.torch"}`` keeps the checkpoint's `[O, K]` layout."""
DECODE_STEP_PRIORITY = 50
"""Never the default binding: only the fast decode step (``model/fast_decode.py``) binds ``cpu.decode``."""
register(Impl(op="kv_write", backend="cpu", name="decode", fn="backends.cpu.decode:kv_write_decode_cpu",
              priority=DECODE_STEP_PRIORITY))
register(Impl(op="rotary", backend="cpu", name="decode", fn="backends.cpu.decode:rotary_decode_cpu",
              priority=DECODE_STEP_PRIORITY, capturable=True))
register(Impl(op="attention_decode", backend="cpu", name="decode", fn="backends.cpu.decode:attention_decode_copies_cpu",
              priority=DECODE_STEP_PRIORITY))

QUANTIZED_LINEARS = ("linear_int4", "linear_int8", "linear_ternary")


def register_dequantized(backend: str, priority: int = 90) -> None:
    """Register the portable dense-decoding implementation of every quantized linear on ``backend``."""
    for op in QUANTIZED_LINEARS:
        register(Impl(op=op, backend=backend, name="dequant", fn="backends.cpu.quantized_dequant:linear_dequantized",
                      priority=priority, capturable=True, prepare="backends.cpu.quantized_dequant:prepare_dequantized"))


for _op in QUANTIZED_LINEARS:
    register(Impl(op=_op, backend="cpu", name="reference", fn=f"backends.cpu.reference.linear:{_op}_ref", priority=100,
                  prepare="backends.cpu.reference.linear:prepare_quantized_ref"))
    register(Impl(op=_op, backend="cpu", name="torch", fn="backends.cpu.quantized:linear_packed",
                  supports=_lazy_supports("backends.cpu.quantized"), priority=0, capturable=True,
                  prepare=f"backends.cpu.quantized:prepare_{_op.removeprefix('linear_')}"))
register(Impl(op="linear_ternary", backend="cpu", name="torch_2bit", fn="backends.cpu.ternary2:linear_ternary_2bit",
              supports=_lazy_supports("backends.cpu.ternary2"), priority=10, capturable=True,
              prepare="backends.cpu.ternary2:prepare_ternary_2bit"))
"""Ternary held in 2 bits (``backends/cpu/ternary2.py``): behind ``cpu.torch`` (4-bit codes, ~2x faster
per decode linear); chosen with ``hal.load_model(..., prefer={"linear_ternary": "cpu.torch_2bit"})``."""
register_dequantized("cpu")
