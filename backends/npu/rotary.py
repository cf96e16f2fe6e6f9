"""rotary on the NPU through ``npu_rotary_mul`` (NeoX ``'half'`` mode, BSND with BS1D cos/sin)."""
from __future__ import annotations

import torch

from backends.npu.runtime import torch_npu


def rotary_npu(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[B, T, H, D]`, k `[B, T, Hk, D]`, cos/sin `[B, T, D]` float32 (LongRoPE factors,
    no mscale: values in [-1, 1], npu_rotary_mul's documented range) -> (q', k') in the input dtypes.

    The rotation runs in float32 (the catalogue's precision: cos/sin are not rounded to bf16);
    ``npu_rotary_mul`` needs x, r1 and r2 in one dtype, so q/k are upcast and rounded once."""
    tnpu = torch_npu()
    c = cos.float()[:, :, None, :]
    s = sin.float()[:, :, None, :]
    q_out = tnpu.npu_rotary_mul(q.float(), c, s, rotary_mode="half").to(q.dtype)
    k_out = tnpu.npu_rotary_mul(k.float(), c, s, rotary_mode="half").to(k.dtype)
    return q_out, k_out
