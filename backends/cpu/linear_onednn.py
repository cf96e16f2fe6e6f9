"""The CPU's float32 ``linear`` on the checkpoint's `[O, K]` weights ("cpu.onednn").

Eager: oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``) on the `[O, K]` row-major
weight as the checkpoint holds it: no copy at load, and on AVX2 CPUs per decode product as fast as
or faster than MKL's GEMM on a pre-transposed `[K, O]` copy (``cpu.torch_kn``).

Traced into a compiled graph (``torch.compiler.is_compiling()``: the AOTInductor decoder layer of
``model/compiled_decode.py``), a one-row product is written as the reduction
``(x[..., None, :] * W).sum(-1)``, which inductor turns into one vectorized, threaded loop over
the weight's rows fused with what feeds it; the extern GEMM call it would otherwise make costs
more at one row, and oneDNN's op cannot be compiled with its weight as a graph input (inductor's
lowering asks for a constant). More rows are traced as ``F.linear``.

Measured on SmolLM2-135M (float32, AMD EPYC AVX2, 2 threads; benchmarks/RESULTS.md, "CPU decode
(issue 13)"): the compiled decode step 36.5 ms/token with ``cpu.torch_kn``'s products against 26.5
with the traced reductions (6 interleaved rounds of 32 steps, median).

Where it binds: CPUs whose torch kernels dispatch below AVX-512 (``torch.backends.cpu.get_cpu_capability()``).
On AVX-512 oneDNN's one-row inner product is the slower kernel, prepacked or not, and ``cpu.torch_kn``
binds instead: SmolLM2's 120 decode products 23.5 ms against 15.8 (an Intel Xeon with AVX-512 and
AMX, 2 threads, 10 interleaved rounds; 17.0 as ``F.linear``), the eager float32 step 37.2 against
27.9 ms/token, the compiled one 26.2 against 22.3. On the AVX2 machine above the eager products were
23.7 ms against 25.2. :func:`cpu_reason` holds the rule.

Values: float32 sums in oneDNN's or inductor's order instead of MKL's (a few ulps; the catalogue's
``linear`` tolerance holds, tests/ops/test_linear.py). Weights that are not contiguous `[O, K]`
(another implementation's layout) take ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SLOWER_ON = ("AVX512",)
"""``torch.backends.cpu.get_cpu_capability()`` values where ``cpu.torch_kn``'s GEMM measured faster."""


def cpu_reason() -> str | None:
    """Why this torch build or CPU does not take ``cpu.onednn`` for float32 linears (``cpu.torch_kn``
    binds then), or None (see the module doc)."""
    if not torch.backends.mkldnn.is_available():
        return "cpu.onednn: torch was built without oneDNN (torch.backends.mkldnn.is_available() is False)"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in SLOWER_ON:
        return (f"cpu.onednn: on {capability} CPUs oneDNN's one-row product measured slower than "
                f"cpu.torch_kn's GEMM (SmolLM2's decode products 23.5 vs 15.8 ms)")
    return None


def supports(ctx) -> str | None:
    if ctx.dtype != torch.float32:
        return (f"cpu.onednn: dtype must be float32 (bfloat16 / float16 linears keep cpu.torch's "
                f"F.linear), got {ctx.dtype_name}")
    return cpu_reason()


def linear_onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x `[..., K]` @ weight `[O, K]` (.T) -> `[..., O]`, float32."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or not weight.is_contiguous() \
            or x.numel() == 0 or weight.shape[0] == 0:
        return F.linear(x, weight)
    if torch.compiler.is_compiling():
        if x.numel() == x.shape[-1]:
            return (x.unsqueeze(-2) * weight).sum(-1)
        return F.linear(x, weight)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, None, "none", [], "")
    return out.reshape(*x.shape[:-1], weight.shape[0])
