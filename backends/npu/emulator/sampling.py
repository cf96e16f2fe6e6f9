"""Emulated ``npu_top_k_top_p`` (vLLM's top-k then top-p filter, as vLLM-Ascend uses it)."""
from __future__ import annotations

import torch

from backends.npu.emulator.checks import require, require_dtype
from backends.npu.emulator.graphs import aclnn_op

OP = "npu_top_k_top_p"


@aclnn_op
def npu_top_k_top_p(logits: torch.Tensor, p: torch.Tensor | None = None, k: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Return logits `[B, V]` with the filtered entries set to -inf.

    k: int32 `[B]` in [1, min(1024, V)]: keep each row's k largest (ties with the k-th kept).
    p: `[B]` in [0, 1], logits' dtype: then, on the softmax of the top-k survivors sorted ascending
    (stable), drop each token whose cumulative probability is <= 1 - p; the largest is always kept.
    Ties at the boundary therefore keep the *higher* indices: logits [1, 1, 1, 0], p = 0.5 ->
    [-inf, 1, 1, -inf]. p and k cannot both be None."""
    require(p is not None or k is not None, OP, "p and k cannot both be None")
    require(logits.dim() == 2, OP, f"logits must be 2-D (B, V), got {logits.dim()}-D")
    require_dtype(OP, "logits", logits, (torch.float32, torch.float16, torch.bfloat16))
    batch, vocab = logits.shape
    out = logits.float().clone()
    if k is not None:
        require_dtype(OP, "k", k, (torch.int32,))
        require(k.shape == (batch,), OP, f"k must be ({batch},), got {tuple(k.shape)}")
        top = min(1024, vocab)
        require(bool(((k >= 1) & (k <= top)).all()), OP, f"k must be in [1, {top}], got {k.tolist()}")
        ordered = out.sort(dim=-1, descending=True).values
        kth = ordered.gather(-1, (k.long() - 1)[:, None])
        out = out.masked_fill(out < kth, float("-inf"))
    if p is not None:
        require(p.dtype == logits.dtype, OP, f"p dtype must equal logits dtype {logits.dtype}, got {p.dtype}")
        require(p.shape == (batch,), OP, f"p must be ({batch},), got {tuple(p.shape)}")
        require(bool(((p >= 0) & (p <= 1)).all()), OP, f"p must be in [0, 1], got {p.tolist()}")
        # as documented: an ascending stable sort, drop while the cumulative probability <= 1 - p,
        # the last (largest; among equal logits the highest index) always kept
        values, order = out.sort(dim=-1, descending=False, stable=True)
        probs = torch.softmax(values, dim=-1)
        drop = probs.cumsum(dim=-1) <= (1 - p.float())[:, None]
        drop[:, -1] = False
        out = out.scatter(-1, order, values.masked_fill(drop, float("-inf")))
    return out.to(logits.dtype)
