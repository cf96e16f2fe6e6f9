"""The portable implementation of the quantized linears on every device: ``prepare`` decodes the
container once into a dense weight in the model dtype on the model device, so it saves no memory
and gains no speed. It is the last resort behind each backend's packed kernels (priority 90),
listed in the bound-op record like any other implementation."""
from __future__ import annotations

import torch

from backends.cpu import linear_kn, linear_onednn
from hal.probing import torch_device


def prepare_dequantized(weight, ctx) -> torch.Tensor:
    """``hal.quant`` container -> dense `[O, K]` in ``ctx.dtype`` on ``ctx.device`` (float32 on a CPU
    where ``cpu.torch_kn`` is the dense float32 ``linear``: in its pre-transposed layout)."""
    dense = weight.dequantize().to(device=torch_device(ctx.device), dtype=ctx.dtype)
    if dense.device.type == "cpu" and dense.dtype == torch.float32 and linear_onednn.cpu_reason() is not None:
        return linear_kn.prepare_linear_kn(dense)
    return dense


def linear_dequantized(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x `[..., K]` @ the prepared dense weight `[O, K]`. float32 on the CPU: the product of the dense
    float32 ``linear`` this CPU binds (``cpu.onednn``, or ``cpu.torch_kn`` where oneDNN is the slower
    kernel), so a model dequantized at load computes bit for bit as the dense model of the same values
    (tests/test_cpu_speed_cli.py: a Q8_0 GGUF and its F32 conversion)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:  # the layout prepare chose says which
        if weight.is_contiguous() and torch.backends.mkldnn.is_available():
            return linear_onednn.linear_onednn(x, weight)
        return linear_kn.linear_kn(x, weight)
    return torch.nn.functional.linear(x, weight)
