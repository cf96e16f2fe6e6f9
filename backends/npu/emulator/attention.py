"""Emulated ``npu_fused_infer_attention_score`` (FIA), the inference attention of Atlas A2/A3.

Implemented: layouts BSH, BSND, BNSD, TND; GQA (``num_key_value_heads``); ``scale`` (default
1.0, as on hardware); ``sparse_mode`` 0-4 with ``atten_mask`` (True = masked out); paged KV
through ``block_table`` + ``block_size`` with K/V viewed as ``[num_blocks, block_size, Hk*D]``
(BnBsH) or ``[num_blocks, Hk, block_size, D]`` (BnNBsD); ``actual_seq_lengths`` /
``actual_seq_lengths_kv`` as documented (TND: cumulative q ends; TND without cache: cumulative
kv ends; paged: per-request kv lengths; BSH/BSND/BNSD: per-batch lengths, one value broadcasts;
a list longer than the batch is accepted and its first B values are read); fully masked rows
(zeros with ``sparse_mode=3`` and Q_S > KV_S, where the op turns on its row-invalid correction,
and with ``inner_precise`` 2/3; otherwise undefined on hardware and NaN here);
``softmax_lse_flag`` (off: a shape-(1,) zero tensor; on: `(B, N, S, 1)`, TND `(T, N, 1)`).
Quantisation, pse, shared prefixes and rope splits are documented options the emulator refuses
with :class:`NotEmulatedError`.

Constraints checked as the op-plugin FIA doc states them (``npu_audit.md``): TND needs the last
cumulative length equal to T (CANN's "queryT(21) must be equal to the last element of
actualSequenceLengthQ(20)") and head dim 128 or 192 (the documented TND dims; 64 is unsettled, so
the backend sends head dim 64 through BSND); other layouts take head dims that are multiples of
16 up to 512 (an emulator assumption, unverified); paged ``block_size``: a multiple of 16 up to
1024 in TND, otherwise a multiple of 128 in [128, 512] when Q_S > 1 and in (0, 512] when Q_S = 1.
"""
from __future__ import annotations

import math

import torch

from backends.npu.emulator.checks import not_emulated, require, require_contiguous, require_dtype
from backends.npu.emulator.graphs import aclnn_op
from backends.npu.emulator.masks import BIG, MASK_DTYPES, check_compressed, visible

OP = "npu_fused_infer_attention_score"
_LAYOUTS = ("BSH", "BSND", "BNSD", "TND")
TND_HEAD_DIMS = (128, 192)  # op-plugin FIA doc; a May 2026 CANN tiling error also lists 64 (unsettled)
_NOT_EMULATED = (
    "pse_shift", "dequant_scale1", "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2",
    "antiquant_scale", "antiquant_offset", "key_antiquant_scale", "key_antiquant_offset",
    "value_antiquant_scale", "value_antiquant_offset", "query_padding_size", "kv_padding_size",
    "key_shared_prefix", "value_shared_prefix", "actual_shared_prefix_len", "query_rope", "key_rope",
    "key_rope_antiquant_scale",
)


def _to_heads(t: torch.Tensor, layout: str, heads: int, name: str) -> torch.Tensor:
    """Non-paged tensor -> `[B, S, N, D]` (TND -> `[1, T, N, D]`)."""
    if layout == "TND":
        require(t.dim() == 3, OP, f"{name} must be 3-D (T, N, D) for TND, got {t.dim()}-D")
        return t[None]
    require(t.dim() == (3 if layout == "BSH" else 4), OP, f"{name} rank does not match input_layout {layout}")
    if layout == "BSH":
        require(t.shape[-1] % heads == 0, OP,
                f"{name} hidden {t.shape[-1]} is not divisible by {heads} heads")
        return t.unflatten(-1, (heads, t.shape[-1] // heads))
    return t.transpose(1, 2) if layout == "BNSD" else t


def _lengths(values, count: int, name: str) -> list[int] | None:
    """Per-batch lengths: one value for every sequence, or at least ``count`` (the first are read)."""
    if values is None:
        return None
    values = [int(v) for v in values]
    require(len(values) == 1 or len(values) >= count, OP,
            f"{name} must hold 1 or at least {count} values, got {len(values)}")
    return values * count if len(values) == 1 else values[:count]


def _cumulative(values, total: int, name: str, tensor: str) -> list[tuple[int, int]]:
    require(values is not None, OP, f"input_layout TND needs {name} (cumulative end offsets)")
    ends = [int(v) for v in values]
    require(len(ends) >= 1, OP, f"{name} must not be empty")
    require(all(b >= a for a, b in zip([0] + ends, ends)), OP,
            f"{name} must be non-decreasing cumulative ends, got {ends}")
    require(ends[-1] == total, OP,
            f"when layout is TND, {tensor}T({total}) must be equal to the last element of {name}({ends[-1]})")
    return list(zip([0] + ends[:-1], ends))


def _paged_kv(cache: torch.Tensor, block_table: torch.Tensor, block_size: int, kv_heads: int,
              dim: int, row: int, length: int, name: str) -> torch.Tensor:
    """Gather sequence ``row``'s first ``length`` tokens from paged ``cache`` -> `[length, Hk, D]`."""
    if cache.dim() == 3:  # BnBsH
        require(cache.shape[1] == block_size and cache.shape[2] == kv_heads * dim, OP,
                f"paged {name} must be (num_blocks, {block_size}, {kv_heads * dim}), "
                f"got {tuple(cache.shape)}")
        blocks = cache.unflatten(-1, (kv_heads, dim))
    else:  # BnNBsD
        require(tuple(cache.shape[1:]) == (kv_heads, block_size, dim), OP,
                f"paged {name} must be (num_blocks, {kv_heads}, {block_size}, {dim}), "
                f"got {tuple(cache.shape)}")
        blocks = cache.transpose(1, 2)
    needed = math.ceil(length / block_size)
    require(needed <= block_table.shape[1], OP,
            f"sequence {row} needs {needed} blocks for {length} kv tokens, "
            f"block_table has {block_table.shape[1]}")
    ids = block_table[row, :needed].long()
    require(bool(((ids >= 0) & (ids < cache.shape[0])).all()), OP,
            f"block_table row {row} holds block ids outside [0, {cache.shape[0]})")
    return blocks[ids].flatten(0, 1)[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float,
            zero_empty: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[Sq, N, D]`, k/v `[Skv, Hk, D]`, keep `[Sq, Skv]` -> out `[Sq, N, D]` f32, lse `[Sq, N]`.
    Rows that see no key: zeros when ``zero_empty`` (the op corrects them), else NaN (undefined)."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("snd,tnd->nst", q.float(), kf) * scale
    scores = scores.masked_fill(~keep[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    empty = ~keep.any(dim=-1)
    fill = 0.0 if zero_empty else float("nan")
    probs = probs.masked_fill(empty[None, :, None], fill)
    out = torch.einsum("nst,tnd->snd", probs, vf)
    return out, lse.transpose(0, 1)


@aclnn_op
def npu_fused_infer_attention_score(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, atten_mask: torch.Tensor | None = None,
    actual_seq_lengths=None, actual_seq_lengths_kv=None, block_table: torch.Tensor | None = None,
    num_heads: int = 1, scale: float = 1.0, pre_tokens: int = BIG, next_tokens: int = BIG,
    input_layout: str = "BSH", num_key_value_heads: int = 0, sparse_mode: int = 0, inner_precise: int = 0,
    block_size: int = 0, antiquant_mode: int = 0, key_antiquant_mode: int = 0, value_antiquant_mode: int = 0,
    softmax_lse_flag: bool = False, **documented_but_not_emulated,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention ``softmax(scale * q k^T + mask) v`` per sequence, GQA, optional paged KV.

    query: BSH `(B, S, N*D)`, BSND `(B, S, N, D)`, BNSD `(B, N, S, D)` or TND `(T, N, D)`;
    fp16/bf16 (fp32 is rejected), contiguous. key/value: the same layout with Hk heads, or the
    paged cache (see module docstring) when ``block_table`` (int32 `[B, max_blocks]`) is given.
    Returns (attention_out in query's layout and dtype, softmax_lse float32: `(B, N, S, 1)` (TND
    `(T, N, 1)`) when ``softmax_lse_flag``, else a shape-(1,) zero tensor)."""
    for name, value_ in documented_but_not_emulated.items():
        if name not in _NOT_EMULATED:
            raise TypeError(f"{OP}() got an unexpected keyword argument '{name}'")
        if value_ is not None:
            raise not_emulated(OP, name)
    if antiquant_mode or key_antiquant_mode or value_antiquant_mode:
        raise not_emulated(OP, "KV anti-quantisation")
    require(input_layout in _LAYOUTS, OP,
            f"input_layout must be one of {_LAYOUTS} here, got {input_layout!r}")
    require_dtype(OP, "query", query, (torch.float16, torch.bfloat16))
    for name, t in (("key", key), ("value", value)):
        require(t.dtype == query.dtype, OP,
                f"{name} dtype must equal query dtype {query.dtype}, got {t.dtype}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        require_contiguous(OP, name, t)
    require(sparse_mode in (0, 1, 2, 3, 4), OP, f"sparse_mode must be 0-4 for FIA, got {sparse_mode}")
    require(inner_precise in (0, 1, 2, 3), OP, f"inner_precise must be 0-3, got {inner_precise}")
    kv_heads = num_key_value_heads or num_heads
    require(num_heads % kv_heads == 0 and num_heads // kv_heads <= 64, OP,
            f"num_heads / num_key_value_heads must be an integer <= 64, got {num_heads} / {kv_heads}")
    q = _to_heads(query, input_layout, num_heads, "query")
    require(q.shape[2] == num_heads, OP, f"query has {q.shape[2]} heads, num_heads says {num_heads}")
    dim = q.shape[-1]
    require(dim <= 512 and dim % 16 == 0, OP, f"head dim must be a multiple of 16 and <= 512, got {dim}")
    if input_layout == "TND":
        require(dim in TND_HEAD_DIMS, OP,
                f"input_layout TND needs head dim 128 or 192 (op-plugin FIA doc), got {dim}")
    compressed = check_compressed(OP, atten_mask, sparse_mode) if sparse_mode in (2, 3, 4) else None
    if sparse_mode == 1:
        require(atten_mask is not None, OP, "sparse_mode=1 needs a full atten_mask")
    if atten_mask is not None and sparse_mode in (0, 1):
        require_dtype(OP, "atten_mask", atten_mask, MASK_DTYPES)
        if input_layout == "TND":
            raise not_emulated(OP, "a full atten_mask with input_layout TND")
    paged = block_table is not None

    # per-sequence (q [Sq, N, D], start offset into the flat q rows) and kv getters
    if input_layout == "TND":
        q_spans = _cumulative(actual_seq_lengths, q.shape[1], "actual_seq_lengths", "query")
        batch = len(q_spans)
        q_rows = [(0, a, b) for a, b in q_spans]
    else:
        batch, seq = q.shape[0], q.shape[1]
        q_lens = _lengths(actual_seq_lengths, batch, "actual_seq_lengths") or [seq] * batch
        require(all(0 <= n <= seq for n in q_lens), OP,
                f"actual_seq_lengths must be in [0, {seq}], got {q_lens}")
        q_rows = [(b, 0, q_lens[b]) for b in range(batch)]

    if paged:
        require_dtype(OP, "block_table", block_table, (torch.int32,))
        require(block_table.dim() == 2 and block_table.shape[0] == batch, OP,
                f"block_table must be (batch={batch}, max_blocks), got {tuple(block_table.shape)}")
        require(key.dim() in (3, 4) and key.shape == value.shape, OP,
                "paged key/value must be 3-D or 4-D, one shape")
        if input_layout == "TND":
            require(block_size % 16 == 0 and 16 <= block_size <= 1024, OP,
                    f"paged attention in TND needs block_size a multiple of 16 up to 1024, got {block_size}")
        elif q.shape[1] > 1:
            require(block_size % 128 == 0 and 128 <= block_size <= 512, OP,
                    "paged attention with query length > 1 needs block_size a multiple of 128 in "
                    f"[128, 512], got {block_size}")
        else:
            require(0 < block_size <= 512, OP, f"paged decode needs 0 < block_size <= 512, got {block_size}")
        require(actual_seq_lengths_kv is not None, OP,
                "paged attention needs actual_seq_lengths_kv (per request)")
        kv_lens = [int(n) for n in actual_seq_lengths_kv]
        require(len(kv_lens) >= batch, OP,
                f"actual_seq_lengths_kv must hold at least {batch} per-request lengths, got {kv_lens}")
        kv_lens = kv_lens[:batch]
        kv_of = [(_paged_kv(key, block_table, block_size, kv_heads, dim, b, kv_lens[b], "key"),
                  _paged_kv(value, block_table, block_size, kv_heads, dim, b, kv_lens[b], "value"))
                 for b in range(batch)]
    else:
        k = _to_heads(key, input_layout, kv_heads, "key")
        v = _to_heads(value, input_layout, kv_heads, "value")
        require(k.shape == v.shape and k.shape[2] == kv_heads and k.shape[3] == dim, OP,
                f"key/value must have {kv_heads} heads of dim {dim}, "
                f"got {tuple(key.shape)} / {tuple(value.shape)}")
        if input_layout == "TND":
            spans = _cumulative(actual_seq_lengths_kv, k.shape[1], "actual_seq_lengths_kv", "key")
            require(len(spans) == batch, OP,
                    f"actual_seq_lengths_kv must hold {batch} values, got {len(spans)}")
            kv_of = [(k[0, a:b], v[0, a:b]) for a, b in spans]
        else:
            require(k.shape[0] == batch, OP, f"key batch {k.shape[0]} != query batch {batch}")
            kv_lens = _lengths(actual_seq_lengths_kv, batch, "actual_seq_lengths_kv") or [k.shape[1]] * batch
            kv_of = [(k[b, :kv_lens[b]], v[b, :kv_lens[b]]) for b in range(batch)]

    full4 = None
    if atten_mask is not None and sparse_mode in (0, 1):
        full4 = atten_mask.bool()  # (Sq, Skv) shared, (B|1, Sq, Skv) or (B|1, 1, Sq, Skv)
        require(full4.dim() in (2, 3, 4), OP, f"full atten_mask must be 2-D to 4-D, got {full4.dim()}-D")
        full4 = full4.reshape((-1, 1) + tuple(full4.shape[-2:]))
        require(full4.shape[0] in (1, batch), OP,
                f"atten_mask batch must be 1 or {batch}, got {full4.shape[0]}")
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    for index, (b, start, end) in enumerate(q_rows):
        kb, vb = kv_of[index]
        sq, skv = end - start, kb.shape[0]
        if sq == 0:
            continue
        full = None
        if full4 is not None:
            fm = full4[min(index, full4.shape[0] - 1), 0]
            require(fm.shape[0] >= sq and fm.shape[1] >= skv, OP,
                    f"atten_mask {tuple(atten_mask.shape)} is smaller than (Sq={sq}, Skv={skv})")
            full = fm[:sq, :skv]
        keep = visible(sq, skv, sparse_mode, compressed, full, pre_tokens, next_tokens, q.device)
        zero_empty = inner_precise in (2, 3) or (sparse_mode == 3 and sq > skv)  # row-invalid correction
        o, l = _attend(q[b, start:end], kb, vb, keep, scale, zero_empty)
        out[b, start:end] = o
        lse[b, start:end] = l
    if input_layout == "TND":
        out, lse = out[0], lse[0]  # lse (T, N)
    else:
        lse = lse.transpose(1, 2)  # (B, N, S)
        if input_layout == "BSH":
            out = out.flatten(-2)
        elif input_layout == "BNSD":
            out = out.transpose(1, 2)
    lse_out = lse[..., None].contiguous() if softmax_lse_flag else torch.zeros(1, device=q.device)
    return out.to(query.dtype).contiguous(), lse_out
