"""``lightning_attention`` (MiniCPM-SALA, Simple GLA with ``g_gamma = -slopes``) as a chunked
Triton kernel with the state in float32 registers.

Torch twin: ``backends.cpu.lightning.lightning_attention_cpu`` (the same chunked algebra);
judge: ``backends.cpu.reference.lightning.lightning_attention_ref`` (token by token). The design
follows fla's ``chunk_simple_gla`` (intra-chunk causal attention weighted by the decay plus the
carried state, then one state update per chunk), fused into one kernel per (row, head, value
tile) that walks the chunks in order, so the state never leaves the chip.

Per chunk of ``BT`` tokens starting from state ``S`` (``[D_k, D_v]``, decay ``lambda = exp(-slope)``):
    o_i  = scale * (lambda^(i+1) q_i @ S + sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j)
    S'   = lambda^n S + sum_j lambda^(n-1-j) outer(k_j, v_j)          (n valid tokens)

Precision: the state is float32 by contract (NMSE 1e-10 even for bf16 inputs), so every product
that touches it or the decayed scores runs in IEEE float32; only ``q @ k^T`` of bf16 / fp16
inputs uses tensor cores (their products are exact in float32).

Why not depend on fla-core (read in fla-core 0.6.0, 2026-12-01; no GPU to measure): its
``chunk_simple_gla`` raises on ``head_first`` (which the HF SALA code passes), and its forward
rounds the decayed values to the input dtype before the state product (``common/chunk_h.py``:
``b_v = (b_v * exp2(...)).to(b_v.dtype)``, per-chunk states stored in the input dtype), so for
bf16 inputs its state cannot meet the float32 bound above. ``benchmarks/gpu_attention.py`` times
it beside this kernel and records the NMSE between the two states where fla is installed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.cpu.lightning import _check_args


@triton.jit
def _lightning_kernel(
    q_ptr, k_ptr, v_ptr, slopes_ptr, state_ptr, o_ptr, new_state_ptr,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    T, HEADS, scale,
    BT: tl.constexpr, HEAD_DIM: tl.constexpr, BV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    b = pid_bh // HEADS
    h = pid_bh % HEADS
    dk = tl.arange(0, HEAD_DIM)
    dv = pid_v * BV + tl.arange(0, BV)
    rate = tl.load(slopes_ptr + h).to(tl.float32)
    state_offsets = pid_bh * HEAD_DIM * HEAD_DIM + dk[:, None] * HEAD_DIM + dv[None, :]
    s = tl.load(state_ptr + state_offsets)  # [D, BV] float32
    i = tl.arange(0, BT)
    lag = (i[:, None] - i[None, :]).to(tl.float32)
    intra = tl.where(lag >= 0, tl.exp(-rate * tl.maximum(lag, 0.0)), 0.0)  # lambda^(i-j), j <= i
    carried = tl.exp(-rate * (i + 1).to(tl.float32))  # lambda^(i+1)
    for start in range(0, T, BT):
        t = start + i
        ok = t < T
        q = tl.load(q_ptr + b * stride_qb + t[:, None] * stride_qt + h * stride_qh + dk[None, :],
                    mask=ok[:, None], other=0.0)
        k = tl.load(k_ptr + b * stride_kb + t[:, None] * stride_kt + h * stride_kh + dk[None, :],
                    mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + b * stride_vb + t[:, None] * stride_vt + h * stride_vh + dv[None, :],
                    mask=ok[:, None], other=0.0).to(tl.float32)
        if q.dtype == tl.float32:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = scores * intra
        qf = q.to(tl.float32)
        kf = k.to(tl.float32)
        o = tl.dot(qf, s, input_precision="ieee") * carried[:, None] + tl.dot(scores, v, input_precision="ieee")
        tl.store(o_ptr + b * stride_ob + t[:, None] * stride_ot + h * stride_oh + dv[None, :],
                 (o * scale).to(o_ptr.dtype.element_ty), mask=ok[:, None])
        n = tl.minimum(T - start, BT)
        to_end = tl.where(ok, tl.exp(-rate * tl.maximum(n - 1 - i, 0).to(tl.float32)), 0.0)  # lambda^(n-1-j)
        s = s * tl.exp(-rate * n.to(tl.float32)) + tl.dot(tl.trans(kf * to_end[:, None]), v, input_precision="ieee")
    tl.store(new_state_ptr + state_offsets, s)


def chunk_size(new: int) -> int:
    """Tokens per chunk: 64 (fla's chunk_simple_gla), 16 for decode steps and short chunks."""
    return 16 if new <= 16 else 64


def lightning_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                               state: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Catalogue ``lightning_attention``.

    Args:
        q, k, v (Tensor): `[B, T, H, D]`, contiguous in D (any other strides), one dtype.
        slopes (Tensor): `[H]` float32, decay per token ``exp(-slopes)``.
        state (Tensor): `[B, H, D, D]` float32 (``[D_k, D_v]`` per head); not modified.
        scale (float): multiplies q, normally ``1/sqrt(D)``.

    Returns:
        o (Tensor): `[B, T, H, D]`, contiguous, q's dtype.
        new_state (Tensor): `[B, H, D, D]` float32.
    """
    _check_args(q, k, v, slopes, state)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"cuda.lightning_attention: {name} must be contiguous in D, got strides {list(x.stride())}")
    batch, new, heads, dim = q.shape
    state = state.contiguous()
    o = torch.empty(batch, new, heads, dim, dtype=q.dtype, device=q.device)
    new_state = torch.empty_like(state)
    # value tiles of 64, or 32 when (row, head, tile) programs would not fill two waves of an
    # H100's 132 multiprocessors (each program walks all chunks in order)
    bv = min(dim, 64 if batch * heads * (dim // 64) >= 264 else 32)
    _lightning_kernel[(batch * heads, dim // bv)](
        q, k, v, slopes.to(device=q.device, dtype=torch.float32).contiguous(), state, o, new_state,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        new, heads, scale,
        BT=chunk_size(new), HEAD_DIM=dim, BV=bv,
        num_warps=8 if dim > 64 else 4,  # a [D, BV] float32 state plus [64, D] q / k tiles per program
    )
    return o, new_state
