"""Ops with no fused torch_npu kernel: plain torch code that runs on the NPU (``npu.torch``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def embedding_npu(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ids `[B, T]` int64, weight `[V, E]` -> `[B, T, E]`."""
    return F.embedding(ids, weight)


def linear_npu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x `[..., K]`, weight `[O, K]` -> x @ weight.T `[..., O]` (aclnn matmul on the NPU)."""
    return F.linear(x, weight)
