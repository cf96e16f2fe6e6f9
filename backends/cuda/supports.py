"""``supports()`` of the Triton implementations: static checks of the model's shapes and dtype,
reasons in the format ``"cuda.<op>: <what> must be <allowed>, got <value>"``. No tensor data,
no device, and triton is looked up (``find_spec``), never imported."""
from __future__ import annotations

import importlib.util
from typing import Callable

from hal.registry import BindContext

HEAD_DIMS = (32, 64, 128)
"""Head dims the kernels are tested with (tests/cuda): a power of two, >= 16 for ``tl.dot``, and
register tiles of ``[64, D]`` per program."""
DTYPES = ("float32", "bfloat16", "float16")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_kernel(op: str, grouped: bool = True) -> Callable[[BindContext], "str | None"]:
    """supports() of the Triton kernel of ``op``; ``grouped``: the op reads KV heads (H % Hk)."""

    def check(ctx: BindContext) -> str | None:
        if not triton_available():
            return f"cuda.{op}: triton must be installed (pip install 'minicpm-hal[cuda]'), got none"
        if ctx.dtype_name not in DTYPES:
            return f"cuda.{op}: dtype must be one of {DTYPES}, got {ctx.dtype_name}"
        dim = ctx.shapes.get("D")
        if dim is not None and dim not in HEAD_DIMS:
            return f"cuda.{op}: head_dim must be in {HEAD_DIMS}, got {dim}"
        heads, kv_heads = ctx.shapes.get("H"), ctx.shapes.get("Hk")
        if grouped and heads and kv_heads and heads % kv_heads:
            return f"cuda.{op}: num_heads must be a multiple of num_kv_heads, got {heads} / {kv_heads}"
        return None

    return check


QUANT_GROUP_MULTIPLE = 16


def quant_kernel(op: str) -> Callable[[BindContext], "str | None"]:
    """supports() of the Triton quantized linears (``quant_linear.py``). ``G`` in the shapes, when
    the binder gives it, is the checkpoint's group size; a container with another one is refused by
    ``prepare_packed`` itself with the same reason (its name in it)."""

    def check(ctx: BindContext) -> str | None:
        if not triton_available():
            return f"cuda.{op}: triton must be installed (pip install 'minicpm-hal[cuda]'), got none"
        if ctx.dtype_name not in DTYPES:
            return f"cuda.{op}: dtype must be one of {DTYPES}, got {ctx.dtype_name}"
        group = ctx.shapes.get("G")
        if group is not None and group % QUANT_GROUP_MULTIPLE:
            return (f"cuda.{op}: group_size must be a multiple of {QUANT_GROUP_MULTIPLE} (one group per K tile, "
                    f"tl.dot's smallest K), got {group}")
        return None

    return check
