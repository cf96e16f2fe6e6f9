"""The CPU's float32 ``logits`` through oneDNN ("cpu.onednn"): ``torch.ops.mkldnn._linear_pointwise``.

``F.linear(x, W)`` on the lm_head's `[V, E]` row-major weight goes to MKL's GEMM with a transposed
B operand; oneDNN's inner-product primitive reads the same `[V, E]` tensor (no copy, no prepare:
the tied embedding keeps reading it) and streams it faster at one activation row. Measured on
SmolLM2-135M's `[49152, 576]` float32 table (AMD EPYC, AVX2, 2 threads, 8 interleaved rounds,
median): 1 row 8.61 ms through ``F.linear`` against 4.92 ms here (MKL on a `[K, V]` copy 4.88 ms,
which would cost a second 113 MB table); 128 rows 80.2 against 64.0 ms. On an Intel Xeon with
AVX-512 and AMX the gap is small (1 row 4.18 ms ``F.linear``, 3.96 here, 3.54 on a `[K, V]` copy; in
the decode step no measurable difference) (benchmarks/RESULTS.md, "CPU decode (issue 13)").

Values: the float32 sums run in oneDNN's order instead of MKL's (differences of a few ulps of the
largest logit; the catalogue's ``logits`` tolerance holds, tests/ops/test_logits.py). A table that
is not a dense contiguous float32 `[V, E]` tensor (a strided view, an empty product) takes
``cpu.torch``'s :func:`~backends.cpu.ops.logits_cpu`.
"""
from __future__ import annotations

import torch

from backends.cpu.ops import logits_cpu


def supports(ctx) -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "cpu.onednn: torch was built without oneDNN (torch.backends.mkldnn.is_available() is False)"
    if ctx.dtype != torch.float32:
        return (f"cpu.onednn: dtype must be float32 (bfloat16 / float16 lm_heads go to cpu.fbgemm's exact "
                f"float16 copy), got {ctx.dtype_name}")
    return None


def logits_onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x `[..., E]` @ weight `[V, E]` (.T) -> `[..., V]` float32."""
    flat = x.reshape(-1, x.shape[-1])
    if not (isinstance(weight, torch.Tensor) and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.is_contiguous() and flat.shape[0] > 0 and weight.shape[0] > 0):
        return logits_cpu(x, weight)
    out = torch.ops.mkldnn._linear_pointwise(flat.float().contiguous(), weight, None, "none", [], "")
    return out.reshape(*x.shape[:-1], weight.shape[0])
