"""attention_prefill / attention_decode / kv_write on the NPU through
``npu_fused_infer_attention_score`` (FIA) and ``npu_scatter_pa_kv_cache``.

Two FIA layouts, chosen at bind time by head dim (``supports.py``): ``TND`` (tokens of all
sequences packed, cumulative q lengths whose last value is T) for the head dims its docs give
(128, 192), ``BSND`` (`[B, S, N, D]` as the model holds it, per-batch lengths) for the others,
64 among them. Every call passes GQA through ``num_key_value_heads``, ``scale`` explicitly (the
op's default is 1.0) and bottom-right causal ``sparse_mode=3`` with the fixed 2048x2048
compressed mask (True = masked out). TND prefill removes left padding (``kv_start``) by packing
only each row's real tokens; BSND prefill shifts each row's real tokens to the front (lengths
count from position 0 there). Queries that see no key get zeros, as the catalogue says: in
decode FIA gives them (sparse_mode 3 with more queries than keys turns on its row-invalid
correction), and a row with no key at all is sent with length 1 and zeroed after.

The model's cache (``model/cache.py``) is `[B, C, Hk, D]` with C a multiple of 128 and each row's
tokens from slot 0 (right-ragged, ``kv_lens``). That buffer *is* a paged cache: viewed as
`[B*C/128, 128, Hk, D]` pages, row b owns pages ``b*C/128 .. (b+1)*C/128 - 1``. kv_write scatters
new tokens into it with ``npu_scatter_pa_kv_cache`` (flat slot ``b*C + slot``) and decode reads it
through FIA with ``block_table = arange(B*C/128).view(B, C/128)`` and per-request
``actual_seq_lengths_kv = kv_lens``: no copy, no allocation of K/V per call.
"""
from __future__ import annotations

import torch

from backends.npu.runtime import torch_npu
from hal.graphs import captured_kv_lens

BLOCK_SIZE = 128  # FIA paged attention: a multiple of 128 in [128, 512] when q length > 1
_MASKS: dict[torch.device, torch.Tensor] = {}
_TABLES: dict[tuple[torch.device, int, int], torch.Tensor] = {}


def causal_mask(device: torch.device) -> torch.Tensor:
    """The compressed causal mask for sparse_mode 2/3/4: `[2048, 2048]` bool, True above the diagonal."""
    if device not in _MASKS:
        _MASKS[device] = torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=device), diagonal=1)
    return _MASKS[device]


def _starts(kv_start: torch.Tensor | None, batch: int) -> list[int]:
    return [0] * batch if kv_start is None else [int(s) for s in kv_start.tolist()]


def _cumulative(lengths: list[int]) -> list[int]:
    ends, total = [], 0
    for n in lengths:
        total += n
        ends.append(total)
    return ends


def _scatter_rows(packed: torch.Tensor, index: torch.Tensor, batch: int, new: int) -> torch.Tensor:
    """packed `[n, H, D]` rows at flat positions ``index`` of `[B*T]` -> `[B, T, H, D]`, zeros elsewhere."""
    out = packed.new_zeros(batch * new, *packed.shape[1:])
    out[index] = packed
    return out.view(batch, new, *packed.shape[1:])


def attention_prefill_npu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor | None,
                          scale: float) -> torch.Tensor:
    """Causal GQA over the prompt: q `[B, T, H, D]`, k/v `[B, T, Hk, D]` (bf16/fp16), kv_start `[B]`
    int64 or None -> `[B, T, H, D]`. Query t of row b sees keys kv_start[b] <= j <= t."""
    batch, new, heads, dim = q.shape
    kv_heads = k.shape[2]
    starts = _starts(kv_start, batch)
    rows = [b for b in range(batch) if starts[b] < new]
    lengths = [new - starts[b] for b in rows]
    if not rows:
        return torch.zeros_like(q)
    index = torch.cat([torch.arange(b * new + starts[b], (b + 1) * new) for b in rows]).to(q.device)
    flat = (q.reshape(batch * new, heads, dim), k.reshape(batch * new, kv_heads, dim),
            v.reshape(batch * new, kv_heads, dim))
    q_t, k_t, v_t = (t[index].contiguous() for t in flat)
    ends = _cumulative(lengths)
    out, _ = torch_npu().npu_fused_infer_attention_score(
        q_t, k_t, v_t, atten_mask=causal_mask(q.device), actual_seq_lengths=ends, actual_seq_lengths_kv=ends,
        num_heads=heads, num_key_value_heads=kv_heads, scale=scale, input_layout="TND", sparse_mode=3)
    return _scatter_rows(out, index, batch, new)


def _front_aligned(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """`[B, T, ...]` with row b's positions shift[b].. moved to 0.. (the tail repeats the last row)."""
    new = x.shape[1]
    index = (torch.arange(new, device=x.device)[None, :] + shift[:, None]).clamp(max=new - 1)
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(x.shape)).contiguous()


def attention_prefill_npu_bsnd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor | None,
                               scale: float) -> torch.Tensor:
    """attention_prefill in FIA's BSND layout (head dims TND does not take, e.g. 64): the same
    contract as :func:`attention_prefill_npu`. Left padding: each row's real tokens are moved to
    the front, FIA reads ``actual_seq_lengths = actual_seq_lengths_kv = T - kv_start[b]`` per row
    (a fully padded row is sent as length 1 and zeroed), and the output is moved back."""
    batch, new, heads, _ = q.shape
    starts = _starts(kv_start, batch)
    lengths = [max(new - s, 1) for s in starts]
    if kv_start is not None:
        shift = kv_start.to(q.device).clamp(max=new - 1)
        q, k, v = (_front_aligned(t, shift) for t in (q, k, v))
    out, _ = torch_npu().npu_fused_infer_attention_score(
        q.contiguous(), k.contiguous(), v.contiguous(), atten_mask=causal_mask(q.device),
        actual_seq_lengths=lengths, actual_seq_lengths_kv=lengths, num_heads=heads,
        num_key_value_heads=k.shape[2], scale=scale, input_layout="BSND", sparse_mode=3)
    if kv_start is None:
        return out
    start = kv_start.to(q.device)
    columns = torch.arange(new, device=q.device)[None, :]
    back = (columns - start[:, None]).clamp(min=0)
    out = out.gather(1, back[:, :, None, None].expand(out.shape))
    return torch.where((columns >= start[:, None])[:, :, None, None], out, torch.zeros((), dtype=out.dtype))


def _pages(cache: torch.Tensor) -> torch.Tensor:
    """`[B, C, Hk, D]` cache -> its zero-copy page view `[B*C/128, 128, Hk, D]`."""
    batch, capacity, kv_heads, dim = cache.shape
    if capacity % BLOCK_SIZE:
        raise ValueError(f"npu: the KV cache capacity must be a multiple of {BLOCK_SIZE} (paged view), "
                         f"got {capacity}")
    return cache.view(batch * capacity // BLOCK_SIZE, BLOCK_SIZE, kv_heads, dim)


def block_table(batch: int, pages: int, device: torch.device) -> torch.Tensor:
    """``arange(B*pages).view(B, pages)`` int32: row b reads its own cache row's pages (cached)."""
    key = (device, batch, pages)
    if key not in _TABLES:
        _TABLES[key] = torch.arange(batch * pages, dtype=torch.int32, device=device).view(batch, pages)
    return _TABLES[key]


def kv_write_npu(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
    """In place: k/v `[B, T, Hk, D]` token (b, t) into position ``slots[b, t]`` of cache row b
    (`[B, C, Hk, D]`, C a multiple of 128); -1 skips. One ``npu_scatter_pa_kv_cache`` on the page
    view with flat slots ``b*C + slot``."""
    batch, new, kv_heads, dim = k.shape
    capacity = k_cache.shape[1]
    k_pages, v_pages = _pages(k_cache), _pages(v_cache)
    slots = slots.to(k_cache.device)
    flat = (slots + capacity * torch.arange(batch, device=slots.device)[:, None]).reshape(-1)
    k_rows, v_rows = k.reshape(batch * new, kv_heads, dim), v.reshape(batch * new, kv_heads, dim)
    keep = slots.reshape(-1) >= 0
    if not bool(keep.all()):
        index = keep.nonzero().squeeze(1)
        flat, k_rows, v_rows = flat[index], k_rows[index], v_rows[index]
    if flat.numel() == 0:
        return
    torch_npu().npu_scatter_pa_kv_cache(k_rows.contiguous(), v_rows.contiguous(), k_pages, v_pages,
                                        flat.contiguous(), cache_mode="Norm")


def fia_kv_lengths(lengths: list[int]) -> list[int]:
    """Per-row ``actual_seq_lengths_kv`` FIA is given: a row with no key is sent as 1 (its output
    is zeroed after), as vLLM-Ascend pads ``seq_lens`` with 1 in graph mode."""
    return [max(int(n), 1) for n in lengths]


def graph_update(kv_lens: list[int]) -> list[dict[str, list[int]]]:
    """``NPUGraph.update(cpu_update_input=...)`` for a decode graph's step: every captured FIA call
    (one per attention layer, all of one batch) reads these kv lengths."""
    return [{"actual_seq_lengths_kv": fia_kv_lengths(kv_lens)}]


def _host_lengths(kv_lens: torch.Tensor) -> list[int]:
    """The per-row lengths as a host list: given by the graph being captured, else read."""
    captured = captured_kv_lens()
    return captured if captured is not None else [int(n) for n in kv_lens.tolist()]


def _zero_keyless_rows(out: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor:
    """Rows with kv_lens 0 (sent to FIA as length 1) -> zeros; device-side, so capturable."""
    has_keys = (kv_lens.to(out.device) > 0)[:, None, None, None]
    return torch.where(has_keys, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _paged_call(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor,
                scale: float, layout: str) -> torch.Tensor:
    batch, new, heads, dim = q.shape
    capacity, kv_heads = k_cache.shape[1], k_cache.shape[2]
    k_pages = _pages(k_cache).view(-1, BLOCK_SIZE, kv_heads * dim)  # BnBsH, zero copy
    v_pages = _pages(v_cache).view(-1, BLOCK_SIZE, kv_heads * dim)
    lengths = fia_kv_lengths(_host_lengths(kv_lens))
    table = block_table(batch, capacity // BLOCK_SIZE, q.device)
    if layout == "TND":
        query = q.reshape(batch * new, heads, dim).contiguous()
        q_lens = dict(actual_seq_lengths=_cumulative([new] * batch))
    else:
        query, q_lens = q.contiguous(), {}
    out, _ = torch_npu().npu_fused_infer_attention_score(
        query, k_pages, v_pages, atten_mask=causal_mask(q.device), block_table=table, block_size=BLOCK_SIZE,
        actual_seq_lengths_kv=lengths, num_heads=heads, num_key_value_heads=kv_heads, scale=scale,
        input_layout=layout, sparse_mode=3, **q_lens)
    return _zero_keyless_rows(out.view(batch, new, heads, dim), kv_lens)


def attention_decode_npu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """New queries against the right-ragged cache that already holds their keys: q `[B, T, H, D]`,
    k_cache / v_cache `[B, C, Hk, D]` (bf16/fp16, C a multiple of 128), kv_lens `[B]` ->
    `[B, T, H, D]`. Query t of row b sees keys j <= kv_lens[b] - T + t. FIA in TND reads the cache
    buffers in place through their page view and ``block_table``: every row's T queries packed
    (``actual_seq_lengths = T, 2T, ..``), per-request ``actual_seq_lengths_kv``. No host read but
    the lengths, which a decode graph supplies (``hal.graphs.host_kv_lens``) and refreshes."""
    return _paged_call(q, k_cache, v_cache, kv_lens, scale, "TND")


def attention_decode_npu_bsnd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`attention_decode_npu` in FIA's BSND layout (q as the model holds it, per-request
    ``actual_seq_lengths_kv``; block size 128 as Q_S > 1 needs)."""
    return _paged_call(q, k_cache, v_cache, kv_lens, scale, "BSND")
