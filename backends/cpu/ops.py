"""The CPU backend's everyday ops: torch code (SDPA, fused elementwise), checked against the
reference in ``tests/ops``. Argument names and layouts are the catalogue's (``hal/ops.py``)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from backends.cpu.table import CodesTable, embedding_table


def embedding_cpu(ids: torch.Tensor, weight: torch.Tensor | CodesTable) -> torch.Tensor:
    if isinstance(weight, CodesTable):  # a quantized token table (backends/cpu/table.py)
        return embedding_table(ids, weight)
    return F.embedding(ids, weight)


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # torch's fused kernel: bitwise the same values as the lines below in float32, in one call
        # instead of seven (tests/ops/test_rms_norm.py checks the equality)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm_composed(x, weight, eps)


def rms_norm_composed(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm in float32 with one rounding of the normalised x to x.dtype before the weight
    (the bf16/fp16 path; in float32 what the fused kernel computes)."""
    xf = x.float()
    normed = xf * xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()  # in place on the fresh [..., 1] mean
    return normed.to(x.dtype) * weight


def add_rms_norm_cpu(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dtype == torch.float32:
        new_residual = torch.add(residual, x, alpha=scale)
    else:
        # float32 sum, one rounding; x is promoted inside the add (exact, so no float32 copy of it)
        new_residual = torch.add(residual.float(), x, alpha=scale).to(x.dtype)
    return rms_norm_cpu(new_residual, weight, eps), new_residual


def _rotate_half_mul(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    float32 = x.dtype == torch.float32
    xf = x if float32 else x.float()  # float32: no no-op casts (each is a dispatched call per layer)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = xf * cos + rotated * sin
    return out if float32 else out.to(x.dtype)


def rotary_cpu(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)
    return _rotate_half_mul(q, cos, sin), _rotate_half_mul(k, cos, sin)


def swiglu_cpu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # bf16/fp16: computed in float32 and rounded once, as fused accelerator kernels do; rounding
    # silu(gate) before the product costs ~0.1 points of top-1 probability error on small models.
    if gate.dtype == torch.float32:
        return F.silu(gate) * up
    return F.silu(gate.float()).mul_(up).to(gate.dtype)  # up promoted in the product: no float32 copy


def sigmoid_gate_cpu(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(gate), in float32 and rounded once (as swiglu)."""
    if x.dtype == torch.float32:
        return x * torch.sigmoid(gate)
    return torch.sigmoid(gate.float()).mul_(x).to(x.dtype)  # x promoted in the product: no float32 copy


UPCAST_MIN_ROWS = 8
"""bfloat16 / float16 linears of at least this many activation rows run as one float32 matmul of
the upcast operands (exact), rounded once, as the bfloat16 GEMM rounds its float32 sums, unless
the CPU has AMX tiles (bfloat16 matrix units: on an Intel Xeon with AMX, 2 threads, the bfloat16
GEMM of [128, 576] x [576, 3072] takes 0.42 ms against 1.98 upcast, [16, ...] 0.19 against 0.80,
[2, ...] 0.17 against 0.44). Measured on an AMD EPYC (AVX2,
2 threads) with SmolLM2's shapes: [128, 576] x [576, 3072] 44.9 ms in bfloat16 against 7.4 ms
upcast, [16, ...] 3.7 against 1.4 ms, [4, ...] 0.96 against 0.85, [2, ...] 0.43 against 0.57
(the weight's conversion costs more than it saves below ~4 rows)."""


@functools.cache
def _bfloat16_matrix_units() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def linear_cpu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 and x.numel() >= UPCAST_MIN_ROWS * x.shape[-1] and weight.dtype == x.dtype \
            and not _bfloat16_matrix_units():
        return F.linear(x.float(), weight.float()).to(x.dtype)
    return F.linear(x, weight)


LOGITS_ROWS_PER_CHUNK = 1024


def logits_cpu(x: torch.Tensor, weight: torch.Tensor | CodesTable) -> torch.Tensor:
    """float32 logits without a float32 copy of the whole lm_head: bf16/fp16 weights are upcast
    ``LOGITS_ROWS_PER_CHUNK`` vocabulary rows at a time into one scratch buffer (it stays in
    cache), each chunk multiplied in float32. Measured on the 0.5B shapes (2 cores): 11 ms per
    decode token against 8 ms for a bf16 GEMM whose rounded output would cost accuracy. A
    quantized table (:class:`CodesTable`) is decoded chunk by chunk into the same buffer (the same
    products as on its dense form, bitwise, in bf16 / fp16)."""
    xf = x.float()
    if isinstance(weight, CodesTable):
        return _logits_codes(xf, weight, x.shape[:-1])
    if weight.dtype == torch.float32:
        return F.linear(xf, weight)
    vocab, width = weight.shape
    x_t = xf.reshape(-1, width).t().contiguous()  # [E, M]
    out_t = torch.empty(vocab, x_t.shape[1], dtype=torch.float32, device=x.device)  # [V, M]
    # a fresh buffer per call: a cached one would be shared between threads and, created under
    # inference_mode, could not be written outside it
    buffer = torch.empty(min(LOGITS_ROWS_PER_CHUNK, vocab), width, dtype=torch.float32, device=x.device)
    for start in range(0, vocab, LOGITS_ROWS_PER_CHUNK):
        rows = weight[start:start + LOGITS_ROWS_PER_CHUNK]
        chunk = buffer[:rows.shape[0]]
        chunk.copy_(rows)
        torch.mm(chunk, x_t, out=out_t[start:start + rows.shape[0]])
    return out_t.t().reshape(*x.shape[:-1], vocab)


def _logits_codes(xf: torch.Tensor, table: CodesTable, lead: torch.Size) -> torch.Tensor:
    """:func:`logits_cpu` over a quantized table: each chunk of rows decoded into the scratch buffer
    (:meth:`CodesTable.rows_into`), the same products as over the dense table."""
    vocab, width = table.shape
    x_t = xf.reshape(-1, width).t().contiguous()  # [E, M]
    out_t = torch.empty(vocab, x_t.shape[1], dtype=torch.float32, device=xf.device)  # [V, M]
    rows = min(LOGITS_ROWS_PER_CHUNK, vocab)
    buffer = torch.empty(rows, width, dtype=torch.float32, device=xf.device)
    scratch = torch.empty(rows, width, dtype=table.dtype, device=xf.device)
    for start in range(0, vocab, LOGITS_ROWS_PER_CHUNK):
        chunk = buffer[:min(LOGITS_ROWS_PER_CHUNK, vocab - start)]
        table.rows_into(slice(start, start + chunk.shape[0]), chunk, scratch)
        torch.mm(chunk, x_t, out=out_t[start:start + chunk.shape[0]])
    return out_t.t().reshape(*lead, vocab)


def _visibility_mask(new: int, keys: int, kv_start: torch.Tensor | None,
                     device: torch.device) -> torch.Tensor | None:
    """Boolean `[B, 1, T, S]` (True = may attend) for bottom-right causal + left padding;
    None when plain causal/full attention suffices."""
    if kv_start is None or not bool(kv_start.any()):
        return None
    kv_start = kv_start.to(device)
    cols = torch.arange(keys, device=device)
    last = keys - new + torch.arange(new, device=device)
    causal = cols[None, :] <= last[:, None]
    valid = cols[None, :] >= kv_start[:, None]
    return causal[None, None] & valid[:, None, None, :]


def _ragged_mask(new: int, keys: int, kv_lens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Boolean `[B, 1, T, S]` (True = may attend): query t of row b sees key j iff
    ``j <= kv_lens[b] - T + t``."""
    cols = torch.arange(keys, device=device)
    last = kv_lens.to(device)[:, None] - new + torch.arange(new, device=device)[None, :]  # [B, T]
    return (cols[None, None, :] <= last[:, :, None])[:, None]


def _sdpa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 causal: bool, scale: float) -> torch.Tensor:
    """SDPA over q `[B, T, H, D]`, k/v `[B, S, Hk, D]` with a boolean `[B, 1, T, S]` mask (rows that
    see no key give zeros), or top-left ``causal``, or full attention. bf16/fp16: softmax and
    both products in float32, one rounding at the end (what flash attention kernels keep in
    registers); the bf16 SDPA CPU path rounds in between."""
    out_dtype = q.dtype
    if out_dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    if mask is not None:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
        # rows that see no key come out as NaN from SDPA; the contract says zeros
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, enable_gqa=gqa)
    out = out.transpose(1, 2)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def attention_prefill_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          kv_start: torch.Tensor | None, scale: float) -> torch.Tensor:
    new = q.shape[1]
    mask = _visibility_mask(new, new, kv_start, q.device)
    return _sdpa_masked(q, k, v, mask, mask is None and new > 1, scale)


def attention_decode_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA on ``k_cache[:, :max(kv_lens)]``: no mask when every row has the same length and T is 1,
    else the per-row visibility mask (positions past a row's length are masked, never used)."""
    new = q.shape[1]
    lengths = kv_lens.tolist()
    longest = max(lengths)
    if longest <= 0:
        return torch.zeros_like(q)
    k, v = k_cache.narrow(1, 0, longest), v_cache.narrow(1, 0, longest)
    mask = None
    if new > 1 or min(lengths) != longest:
        mask = _ragged_mask(new, longest, kv_lens, q.device)
    return _sdpa_masked(q, k, v, mask, False, scale)


def zero_unused(k_cache: torch.Tensor, v_cache: torch.Tensor,
                kv_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the caches `[B, C, Hk, D]` with positions ``>= kv_lens[b]`` zeroed. Whole-capacity
    attention needs it: a stale NaN there would survive a mask (NaN + -inf is NaN, and a zero
    weight times NaN is NaN). No host read of kv_lens (capturable)."""
    cols = torch.arange(k_cache.shape[1], device=k_cache.device)
    unused = (cols[None, :] >= kv_lens.to(k_cache.device)[:, None])[:, :, None, None]
    return k_cache.masked_fill(unused, 0), v_cache.masked_fill(unused, 0)


def attention_decode_full_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """attention_decode over the whole cache capacity C with the per-row mask: no host read of
    kv_lens, so a device graph can capture it (the cost is C keys per row, not kv_lens[b]).
    Positions past a row's length are zeroed first (:func:`zero_unused`)."""
    mask = _ragged_mask(q.shape[1], k_cache.shape[1], kv_lens, q.device)
    k, v = zero_unused(k_cache, v_cache, kv_lens)
    return _sdpa_masked(q, k, v, mask, False, scale)


def kv_write_cpu(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
    """In place: token (b, t) of k/v `[B, T, Hk, D]` into position ``slots[b, t]`` of cache row b;
    -1 skips. One ``index_put_`` per cache, without reading ``slots`` on the host (so it can be
    captured in a device graph): see :func:`write_targets`."""
    rows, index, keys, values = write_targets(k_cache, v_cache, k, v, slots.to(k_cache.device))
    k_cache.index_put_((rows, index), keys)
    v_cache.index_put_((rows, index), values)


def write_targets(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Where and what a kv_write stores, with the skipped tokens made harmless instead of removed
    (removing them would need their count on the host): a token with slot -1 is written to the
    slot of its row's last kept token with that token's values, so the duplicate writes all carry
    the same data; in a row with no kept token they rewrite slot 0 with what it holds.
    Returns (rows `[B, T]`, slots `[B, T]`, keys `[B, T, Hk, D]`, values `[B, T, Hk, D]`)."""
    batch, new = slots.shape
    keep = slots >= 0
    rows = torch.arange(batch, device=slots.device)[:, None].expand(batch, new)
    order = torch.arange(1, new + 1, device=slots.device)
    anchor = (keep * order).argmax(dim=1, keepdim=True)  # [B, 1]: last kept token (0 if none)
    kept_any = keep.any(dim=1, keepdim=True)
    anchor_slot = slots.gather(1, anchor).clamp(min=0)  # [B, 1]

    def anchor_rows(new_rows: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        pick = anchor[:, :, None, None].expand(batch, 1, *new_rows.shape[2:])
        old = cache[rows[:, :1], anchor_slot]  # [B, 1, Hk, D]
        return torch.where(kept_any[:, :, None, None], new_rows.gather(1, pick), old.to(new_rows.dtype))

    index = torch.where(keep, slots, anchor_slot)
    mask = keep[:, :, None, None]
    keys = torch.where(mask, k, anchor_rows(k, k_cache))
    values = torch.where(mask, v, anchor_rows(v, v_cache))
    return rows, index, keys, values


def sample_cpu(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        values, order = torch.topk(scaled, top_k, dim=-1, sorted=True)
    else:
        values, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    probs = torch.softmax(values, dim=-1)
    if top_p < 1.0:
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)
