from __future__ import annotations

import torch


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up `[..., F]` -> silu(gate) * up, in gate.dtype."""
    g = gate.float()
    return (g / (1.0 + torch.exp(-g)) * up.float()).to(gate.dtype)


def sigmoid_gate_ref(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x, gate `[..., N]` -> x * sigmoid(gate), in x.dtype."""
    return (x.float() / (1.0 + torch.exp(-gate.float()))).to(x.dtype)
