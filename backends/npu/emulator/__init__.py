"""A pure-torch stand-in for the parts of ``torch_npu`` this project calls, for machines with no
Ascend NPU. Each function implements the op's documented semantics (argument names, layouts,
True = masked out, default scale 1.0, sparse_mode, block tables, sequence-length conventions) on
CPU tensors and rejects the calls the real op rejects. Numbers from here are EMULATED, never
hardware results.

Turned on by ``HAL_NPU_EMULATE=1`` (see ``hal/env.py``): :func:`install` puts this module into
``sys.modules["torch_npu"]`` (unless a real torch_npu is already imported) and the NPU backend's
tensors stay on the CPU.
"""
from __future__ import annotations

import sys
import types

from backends.npu.emulator import device as npu
from backends.npu.emulator.attention import npu_fused_infer_attention_score
from backends.npu.emulator.checks import EmulatedOpError, NotEmulatedError
from backends.npu.emulator.kv_cache import npu_scatter_pa_kv_cache
from backends.npu.emulator.norm import npu_add_rms_norm, npu_rms_norm
from backends.npu.emulator.quant_matmul import npu_convert_weight_to_int4pack, npu_weight_quant_batchmatmul
from backends.npu.emulator.rope import npu_rotary_mul
from backends.npu.emulator.sampling import npu_top_k_top_p
from backends.npu.emulator.swiglu import npu_swiglu

__version__ = "emulated"
EMULATED = True
DESCRIPTION = ("emulated Ascend NPU: pure-torch torch_npu stand-in on the CPU (HAL_NPU_EMULATE=1); "
               "not hardware numbers")

__all__ = [
    "DESCRIPTION", "EMULATED", "EmulatedOpError", "NotEmulatedError", "install", "npu",
    "npu_add_rms_norm", "npu_convert_weight_to_int4pack", "npu_fused_infer_attention_score", "npu_rms_norm",
    "npu_rotary_mul", "npu_scatter_pa_kv_cache", "npu_swiglu", "npu_top_k_top_p", "npu_weight_quant_batchmatmul",
]


def install() -> types.ModuleType:
    """Make ``import torch_npu`` return this module (a real, already imported one is kept)."""
    module = sys.modules[__name__]
    sys.modules.setdefault("torch_npu", module)
    return module


def uninstall() -> None:
    """Undo :func:`install` (tests)."""
    if sys.modules.get("torch_npu") is sys.modules[__name__]:
        del sys.modules["torch_npu"]
