"""``supports()`` of the NPU implementations: static checks of dtype and model shapes, with the
reason format ``"npu.<op>: <what> must be <allowed>, got <value>"``. No tensor data, no device."""
from __future__ import annotations

from hal.registry import BindContext

FIA_DTYPES = ("bfloat16", "float16")
FIA_HEAD_DIMS = (64, 128)  # TND: docs say 128; vLLM-Ascend runs MiniCPM-2B (64) in CI


def fused_attention(op: str):
    """supports() of the FIA implementation of ``op`` (attention_prefill / attention_decode)."""

    def check(ctx: BindContext) -> str | None:
        if ctx.dtype_name not in FIA_DTYPES:
            return f"npu.{op}: dtype must be bfloat16 or float16 (FIA), got {ctx.dtype_name}"
        dim = ctx.shapes.get("D")
        if dim is not None and dim not in FIA_HEAD_DIMS:
            return f"npu.{op}: head_dim must be 64 or 128 (FIA TND), got {dim}"
        heads, kv_heads = ctx.shapes.get("H"), ctx.shapes.get("Hk")
        if heads and kv_heads and (heads % kv_heads or heads // kv_heads > 64):
            return f"npu.{op}: num_heads / num_kv_heads must be an integer <= 64, got {heads} / {kv_heads}"
        return None

    return check


def rotary(ctx: BindContext) -> str | None:
    dim = ctx.shapes.get("D")
    if dim is not None and (dim % 2 or dim >= 896):
        return f"npu.rotary: head_dim must be even and < 896 (npu_rotary_mul), got {dim}"
    return None


def kv_write(ctx: BindContext) -> str | None:
    if ctx.dtype_name not in FIA_DTYPES:
        return (f"npu.kv_write: dtype must be bfloat16 or float16 (npu_scatter_pa_kv_cache), "
                f"got {ctx.dtype_name}")
    return None
