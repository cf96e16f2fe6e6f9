"""swiglu on the NPU through ``npu_swiglu`` ([gate, up] order: the first half is the SiLU side)."""
from __future__ import annotations

import torch

from backends.npu.runtime import torch_npu


def swiglu_npu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up `[..., F]` -> silu(gate) * up `[..., F]`.

    ``npu_swiglu`` takes one contiguous `[..., 2F]` tensor, so the halves are concatenated here;
    a model that fused gate_proj and up_proj into one `[2F, E]` weight would skip this copy."""
    return torch_npu().npu_swiglu(torch.cat((gate, up), dim=-1), dim=-1)
