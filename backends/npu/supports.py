"""``supports()`` of the NPU implementations: static checks of dtype and model shapes, with the
reason format ``"npu.<op>: <what> must be <allowed>, got <value>"``. No tensor data, no device."""
from __future__ import annotations

from hal import env
from hal.registry import BindContext

FIA_DTYPES = ("bfloat16", "float16")
TND_HEAD_DIMS = (128, 192)
"""FIA's TND head dims in the op-plugin doc. 64 is unsettled (a May 2026 CANN tiling error lists
192/128/64, sglang's TND whitelist is 128/192/256, an older CANN took only 192), so head dim 64
(MiniCPM4-0.5B, BitCPM4-0.5B, SmolLM2-135M) goes through BSND."""
BSND_MAX_HEAD_DIM = 512  # BSND: head dims multiples of 16 up to 512 (emulator's reading, unverified)


def _head_dim_reason(op: str, layout: str, dim: int) -> str | None:
    if layout == "TND" and dim not in TND_HEAD_DIMS:
        return (f"npu.{op}: head_dim must be 128 or 192 for FIA TND (the op-plugin doc's TND dims; 64 is "
                f"unsettled on CANN), got {dim}")
    if layout == "BSND" and (dim % 16 or dim > BSND_MAX_HEAD_DIM):
        return f"npu.{op}: head_dim must be a multiple of 16 up to {BSND_MAX_HEAD_DIM} for FIA BSND, got {dim}"
    return None


def fused_attention(op: str, layout: str):
    """supports() of the FIA implementation of ``op`` (attention_prefill / attention_decode) in
    ``layout`` (``TND`` or ``BSND``)."""

    def check(ctx: BindContext) -> str | None:
        forced = env.npu_fia_layout()
        if forced is not None and forced != layout:
            return f"npu.{op}: FIA layout {layout} is off (HAL_NPU_FIA_LAYOUT={forced})"
        if ctx.dtype_name not in FIA_DTYPES:
            return f"npu.{op}: dtype must be bfloat16 or float16 (FIA), got {ctx.dtype_name}"
        dim = ctx.shapes.get("D")
        if dim is not None:
            reason = _head_dim_reason(op, layout, dim)
            if reason is not None:
                return reason
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


def weight_quant(op: str):
    """supports() of ``npu_weight_quant_batchmatmul`` for ``op`` (linear_int4 / linear_int8). ``G`` in
    the shapes, when the binder gives it, is the checkpoint's group size; each weight is checked
    again when it is prepared (``quant_linear.unsupported_reason``: K, N, alignment, its name)."""

    def check(ctx: BindContext) -> str | None:
        if ctx.dtype_name not in FIA_DTYPES:
            return (f"npu.{op}: dtype must be bfloat16 or float16 (npu_weight_quant_batchmatmul takes "
                    f"float16 / bfloat16 x and scales), got {ctx.dtype_name}")
        group = ctx.shapes.get("G")
        per_channel = group is not None and group in (ctx.shapes.get("E"), ctx.shapes.get("F"))
        if group is not None and not per_channel and (group < 32 or group % 32):
            return (f"npu.{op}: group_size must be K (per channel) or a multiple of 32 in [32, K-1] "
                    f"(npu_weight_quant_batchmatmul), got {group}")
        return None

    return check
