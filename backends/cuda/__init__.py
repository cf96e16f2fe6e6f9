"""CUDA backend: Triton kernels where torch has none, portable torch for the rest (data only;
triton is imported when a kernel is first bound).

op                      implementation   what runs
attention_decode        cuda.triton      flash-decoding, split-K over kv_lens read on the device
                                         (``decode_attention.py``)
infllm_select_blocks    cuda.triton      stage-1 kernel scores (any GQA ratio) + torch pooling/top-k
                                         (``infllm.py``)
block_sparse_attention  cuda.triton      attention over the selected blocks, split-K for decode
                                         (``infllm.py``)
lightning_attention     cuda.triton      chunked Simple GLA with a float32 on-chip state
                                         (``lightning.py``)
everything else         cuda.torch       the portable torch ops of ``backends/cpu`` (cuBLAS GEMMs,
                                         SDPA flash prefill, torch elementwise)
attention_decode        cuda.torch_full  whole-capacity masked SDPA (capturable fallback)
linear_int4 / _int8 /   cuda.triton      weight-only quantized GEMV (decode, split-K) and GEMM (prefill)
linear_ternary                           on the packed codes (``quant_linear.py``)
                        cuda.dequant     the container decoded once to a dense weight (fallback)

Every Triton implementation reads lengths and block ids on the device (capturable in a CUDA
graph). ``supports.py`` says why one is passed over (no triton, head_dim, dtype).
"""
from __future__ import annotations

from backends.cpu import CAPTURABLE, OPS, QUANTIZED_LINEARS, register_dequantized, torch_fn
from backends.cuda.supports import quant_kernel, triton_kernel
from hal.registry import Impl, register

TRITON_KERNELS = {
    "attention_decode": "backends.cuda.decode_attention:attention_decode_triton",
    "infllm_select_blocks": "backends.cuda.infllm:infllm_select_blocks_triton",
    "block_sparse_attention": "backends.cuda.infllm:block_sparse_attention_triton",
    "lightning_attention": "backends.cuda.lightning:lightning_attention_triton",
}
"""op -> ``module:function`` of its Triton implementation."""

for _op, _fn in TRITON_KERNELS.items():
    register(Impl(op=_op, backend="cuda", name="triton", fn=_fn, priority=10, capturable=True,
                  supports=triton_kernel(_op, grouped=_op != "lightning_attention")))
for _op in OPS:
    register(Impl(op=_op, backend="cuda", name="torch", fn=torch_fn(_op), priority=50, capturable=_op in CAPTURABLE))
register(Impl(op="attention_decode", backend="cuda", name="torch_full",
              fn="backends.cpu.ops:attention_decode_full_cpu", priority=55, capturable=True))

QUANT_KERNELS = {op: "backends.cuda.quant_linear:linear_quantized_triton" for op in QUANTIZED_LINEARS}
"""op -> the Triton implementation of the weight-only quantized linears (``prepare_packed`` repacks)."""
for _op, _fn in QUANT_KERNELS.items():
    register(Impl(op=_op, backend="cuda", name="triton", fn=_fn, priority=10, capturable=True,
                  supports=quant_kernel(_op), prepare="backends.cuda.quant_linear:prepare_packed"))
register_dequantized("cuda")
