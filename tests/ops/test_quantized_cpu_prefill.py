"""The prefill path of the CPU packed quantized linears (backends/cpu/quantized.py): above
``kernel_max_rows`` activation rows the kernel's packed weight is decoded to float32 in row
chunks and multiplied densely in float32. Checked against the float32 reference ``x @ w.dequantize().T``
of every container kind on both sides of the threshold, against hand-made codes whose decoding
is exact (the packer's nibble order on every block shape), and that the path taken is the one
the row count selects."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from backends.cpu import quantized
from hal import quant
from hal.ops import get_spec
from hal.registry import BindContext, bind
from validation.opcheck import random_container

BF16 = BindContext("cpu", torch.bfloat16, {})

KINDS = [  # op, source, out rows (padded to 16 by prepare where odd), K, group
    ("linear_int4", "q4_0", 40, 96, 32),
    ("linear_int4", "q4_1", 80, 160, 32),  # 80 rows: one full AVX512 block of 64 and a short one
    ("linear_int4", "gptq", 72, 192, 64),  # asymmetric zero points; 72 -> 80 padded rows
    ("linear_int8", "rtn", 40, 96, 96),  # per output channel: _weight_int8pack_mm
    ("linear_int8", "q8_0", 72, 96, 32),  # grouped: nibble split over [x | x]
    ("linear_ternary", "bitcpm4", 40, 128, 128),
]


def _nmse(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).pow(2).mean() / want.pow(2).mean())


def _prepare(weight):
    return getattr(quantized, f"prepare_{weight.op.removeprefix('linear_')}")(weight, BF16)


@pytest.mark.parametrize(("op", "source", "rows", "k", "group"), KINDS)
def test_both_paths_match_the_float32_reference(op, source, rows, k, group):
    g = torch.Generator().manual_seed(rows * k)
    weight = random_container(g, op, source, rows, k, group)
    prepared = _prepare(weight)
    limit = quantized.kernel_max_rows(prepared)
    bound = get_spec(op).tolerance("bfloat16")
    for tokens in (limit // 2 - 1, limit // 2 + 3):  # batch 2: 2 * tokens rows below / above the limit
        x = torch.randn(2, tokens, k, generator=g).bfloat16()
        got = quantized.linear_packed(x, prepared)
        assert got.shape == (2, tokens, rows) and got.dtype == torch.bfloat16
        assert _nmse(got, x.float() @ weight.dequantize().t()) < bound, (2 * tokens, limit)


@pytest.mark.parametrize("rows", [16, 48, 64, 80, 112, 960])
def test_decoding_reads_the_packers_nibble_order_exactly(rows):
    # scales 1 and zeros 8: w = q - 8, exact in bfloat16, so the decoded weight must equal the codes
    g = torch.Generator().manual_seed(rows)
    k = 64
    codes = torch.randint(0, 16, (rows, k), generator=g)
    prepared = quantized.pack_int4_kernel(codes, torch.ones(rows, 2), torch.zeros(rows, 2), 32)
    decoded = torch.cat([w for _, _, w in quantized.decode_rows(prepared)], dim=1)  # [K, rows]
    assert torch.equal(decoded.t().float(), (codes - 8).float())


def test_grouped_int8_decodes_to_scale_times_q_in_float32():
    g = torch.Generator().manual_seed(3)
    weight = random_container(g, "linear_int8", "q8_0", 32, 64, 32)
    prepared = _prepare(weight)
    decoded = torch.cat([w for _, _, w in quantized.decode_rows(prepared)], dim=1).t()
    scales = weight.scales.bfloat16().float().repeat_interleave(32, 1)  # the kernel's bfloat16 scales
    assert decoded.dtype == torch.float32 and torch.equal(decoded, scales * weight.q.float())


def test_chunks_stay_under_the_temporary_bound_and_cover_every_row(monkeypatch):
    monkeypatch.setattr(quantized, "DECODE_CHUNK_BYTES", 64 * 96 * 4 * 2)  # two blocks of 64 rows
    g = torch.Generator().manual_seed(4)
    weight = random_container(g, "linear_int4", "q4_1", 300, 96, 32)  # padded to 304: 4 blocks + 48
    prepared = _prepare(weight)
    spans = [(start, stop, w.numel() * 4) for start, stop, w in quantized.decode_rows(prepared)]
    assert len(spans) >= 3 and all(start % prepared.order.block_rows == 0 for start, _, _ in spans)
    assert spans[0][0] == 0 and spans[-1][1] == 304 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(size <= quantized.DECODE_CHUNK_BYTES for _, _, size in spans)
    x = torch.randn(200, 96, generator=g).bfloat16()
    got = quantized.linear_packed(x, prepared)
    assert _nmse(got, x.float() @ weight.dequantize().t()) < get_spec("linear_int4").tolerance("bfloat16")


def test_the_gather_order_agrees_with_the_structured_ones():
    g = torch.Generator().manual_seed(5)
    weight = random_container(g, "linear_int4", "q4_0", 80, 64, 32)
    prepared = _prepare(weight)
    x = torch.randn(100, 64, generator=g).bfloat16()
    fast = quantized.linear_packed(x, prepared)
    gather = dataclasses.replace(prepared.order, block_kind="gather", tail_kind="gather")
    assert torch.equal(quantized.linear_packed(x, dataclasses.replace(prepared, order=gather)), fast)


@pytest.mark.parametrize(("op", "source", "rows", "k", "group"), [KINDS[0], KINDS[3], KINDS[4]])
def test_the_row_count_picks_the_path(monkeypatch, op, source, rows, k, group):
    g = torch.Generator().manual_seed(6)
    prepared = _prepare(random_container(g, op, source, rows, k, group))
    limit = quantized.kernel_max_rows(prepared)
    ops = bind("cpu", torch.bfloat16, {})
    assert ops.record[op].impl == "cpu.torch"

    def refuse(*_):
        raise AssertionError("wrong path")

    with monkeypatch.context() as m:  # above the limit: the kernel must not run
        m.setattr(quantized, "kernel_linear", refuse)
        getattr(ops, op)(torch.randn(limit + 1, k).bfloat16(), prepared)
    with monkeypatch.context() as m:  # at the limit: the decoding must not run
        m.setattr(quantized, "decode_linear", refuse)
        m.setattr(quantized, "decode_int8_linear", refuse)
        getattr(ops, op)(torch.randn(limit, k).bfloat16(), prepared)


def test_nibble_order_is_cached_per_row_count_and_small():
    order = quantized.nibble_order(3072)
    assert quantized.nibble_order(3072) is order
    assert order.block_columns.numel() + order.tail_columns.numel() <= 128  # no per-weight index kept


def test_ternary_zeros_stay_exact_on_the_decoded_path():
    t = torch.tensor([[-1, 0, 1, 0] * 8] * 16)
    weight = quant.TernaryWeight(name="t", source="rtn", out_features=16, in_features=32, group_size=32,
                                 scales=torch.full((16, 1), 0.3), packed=quant.pack_ternary(t))
    prepared = quantized.prepare_ternary(weight, BF16)
    x = torch.zeros(quantized.KERNEL_MAX_ROWS + 1, 32).bfloat16()
    x[:, 1] = 1.0  # picks the column of zeros
    assert torch.equal(quantized.linear_packed(x, prepared).float(), torch.zeros(x.shape[0], 16))
