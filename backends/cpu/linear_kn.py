"""The CPU's float32 ``linear`` from weights held pre-transposed ("cpu.torch_kn").

``F.linear(x, W)`` on the checkpoint's `[O, K]` row-major weight runs the GEMM with a transposed
B operand; the same product from the weight stored `[K, O]` contiguous (``torch.matmul(x, W_kn)``)
streams it in the order the kernel reads it. On SmolLM2-135M's 120 decode linears (one row,
float32, 2 threads) that is ~0.86-0.89x the time, and ~0.94x at 128 prefill rows
(benchmarks/RESULTS.md, "CPU decode (issue 13)"). In bfloat16 the same change is slower (~1.13x
per decode product), so bfloat16 and float16 keep ``cpu.torch``.

Layout: :func:`prepare_linear_kn` copies the weight once at load into a `[K, O]` contiguous
tensor and returns its transposed *view*: still the catalogue's `[O, K]` weight, same values, only
its strides differ (``weight.t().is_contiguous()``). The model holds that view and nothing else (the
`[O, K]` original is freed), and every other implementation of ``linear`` (the reference, a
rounded-ops floor, an override) reads it as an ordinary strided `[O, K]` tensor: there is no layout
a foreign binding could misread. :func:`linear_kn` is correct for any strides too; it is only
faster on the prepared layout.
"""
from __future__ import annotations

import torch


def supports(ctx) -> str | None:
    if ctx.dtype != torch.float32:
        return (f"cpu.torch_kn: dtype must be float32 (in bfloat16 the pre-transposed GEMM measured slower "
                f"than F.linear), got {ctx.dtype_name}")
    return None


def prepare_linear_kn(weight: torch.Tensor, ctx=None) -> torch.Tensor:
    """weight `[O, K]` -> the same values as the transposed view of a `[K, O]` contiguous tensor (one
    copy; none when ``weight`` already has that layout)."""
    return weight.t().contiguous().t()


def linear_kn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x `[..., K]` @ weight `[O, K]` (.T) -> `[..., O]`; weight as :func:`prepare_linear_kn` made it."""
    return torch.matmul(x, weight.t())
