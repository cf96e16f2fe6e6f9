from __future__ import annotations

import torch


def embedding_ref(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ids `[B, T]` int64, weight `[V, E]` -> `[B, T, E]` (weight dtype): row lookup."""
    return weight[ids]
