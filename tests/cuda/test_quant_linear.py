"""The Triton weight-only quantized linears (backends/cuda/quant_linear.py) against the catalogue's
float32 reference (x.float() @ container.dequantize().T, hal/quant.py) for every source format:
GGUF Q4_0 (zero 8), Q4_1 (mins), GPTQ asymmetric (a zero point per group) and symmetric, GGUF
Q8_0 (groups of 32), per-channel int8 and ternary; the GEMV path (decode rows, with and without
split-K) and the GEMM path (prefill rows). Interpreted on CPU tensors without a GPU (float32,
float16; bfloat16 is compiled to an sm_90 cubin in test_compile.py), compiled on one."""
from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE, DTYPES

from backends.cuda import quant_linear as ql
from backends.cuda.supports import quant_kernel
from hal import quant
from hal.errors import UnsupportedOpError
from hal.registry import BindContext, bind, implementations
from validation.opcheck import case, check, random_container

FORMATS = [  # (op, source flag of validation.opcheck.random_container, group size)
    ("linear_int4", "q4_0", 32),
    ("linear_int4", "q4_1", 32),
    ("linear_int4", "gptq", 64),
    ("linear_int8", "q8_0", 32),
    ("linear_int8", "rtn", 128),  # one group per row of K = 128: per output channel
    ("linear_ternary", "rtn", 64),
    ("linear_ternary", "bitcpm4", 128),
]
ROWS = (1, 3, 17)  # GEMV (one row, several rows), GEMM (a partial 32-row tile)


def _prepare(weight, ctx):
    return ql.prepare_packed(weight, ctx)


def _triton(sm_count: int = ql.SM_COUNT):
    return lambda x, weight: ql.linear_quantized_triton(x, weight, sm_count=sm_count)


PARAMS = [pytest.param(op, src, gs, rows, dtype, id=f"{op}-{src}-g{gs}-T{rows}-{dtype}")
          for op, src, gs in FORMATS for rows in ROWS for dtype in DTYPES]


@pytest.mark.parametrize(("op", "source", "group", "rows", "dtype"), PARAMS)
def test_every_format_matches_the_float32_reference(op, source, group, rows, dtype):
    c = case(op, dtype, (source,), B=1, T=rows, K=128, O=96, G=group)
    result = check(c, _triton(), "cuda.triton", DEVICE, prepare=_prepare)
    assert result.status == "ok", result.line()


@pytest.mark.parametrize("sm_count", [1, ql.SM_COUNT])
def test_gemv_with_and_without_split_k(sm_count):
    """sm_count 1: one program per 64 outputs is enough, the kernel writes the output itself;
    132: K is split into its 8 tiles and the float32 partials are summed."""
    tiles = 256 // ql.block_k(32, 128)
    assert ql.choose_splits(2, tiles, sm_count) == (1 if sm_count == 1 else 8)
    c = case("linear_int4", "float32", ("q4_1",), B=1, T=1, K=256, O=128, G=32)
    assert check(c, _triton(sm_count), "cuda.triton", DEVICE, prepare=_prepare).status == "ok"


def _unpack_test(codes: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The documented layout read back element by element: `[K * bits / 8, N]` -> `[N, K]`."""
    per = 8 // bits
    out = torch.empty(codes.shape[1], k, dtype=torch.int64)
    for j in range(k):
        out[:, j] = (codes[j // per].to(torch.int64) >> (bits * (j % per))) & ((1 << bits) - 1)
    return out


def test_the_packed_layout_is_the_documented_one():
    g = torch.Generator().manual_seed(3)
    ctx = BindContext("cpu", torch.float32)
    w4 = random_container(g, "linear_int4", "gptq", 24, 64, 32)
    p4 = ql.prepare_packed(w4, ctx)
    assert p4.codes.dtype == torch.uint8 and tuple(p4.codes.shape) == (32, 24)
    assert torch.equal(_unpack_test(p4.codes, 4, 64), w4.values().long())
    assert torch.equal(p4.zeros.float().t(), w4.zeros)  # asymmetric: the zeros are kept per group
    wt = random_container(g, "linear_ternary", "rtn", 24, 64, 32)
    pt = ql.prepare_packed(wt, ctx)
    assert tuple(pt.codes.shape) == (16, 24) and pt.zero == 1.0
    assert torch.equal(_unpack_test(pt.codes, 2, 64) - 1, wt.values().long())
    w8 = random_container(g, "linear_int8", "q8_0", 24, 64, 32)
    p8 = ql.prepare_packed(w8, ctx)
    assert torch.equal(p8.codes, w8.q.t())
    for w, p in ((w4, p4), (wt, pt), (w8, p8)):
        assert torch.equal(ql.dequantize_packed(p), w.dequantize())  # the torch twin decodes exactly


def _gguf_like_q4_0(out: int, k: int, g: torch.Generator) -> quant.Int4Weight:
    """Q4_0 as GGUF stores it: float16 scales (d), zero 8."""
    scales = ((torch.rand(out, k // 32, generator=g) + 0.5) * k ** -0.5 / 4).half().float()
    return quant.Int4Weight(name="blk.0.attn_q.weight", source="q4_0", out_features=out, in_features=k,
                            group_size=32, scales=scales, packed=quant.pack_int4(torch.randint(0, 16, (out, k),
                                                                                                generator=g)),
                            zeros=torch.full((out, k // 32), 8.0))


def _gptq_sym(out: int, k: int, g: torch.Generator) -> quant.Int4Weight:
    """GPTQ symmetric (gptq_v2 zero 8 everywhere), float16 scales as AutoGPTQ stores them."""
    scales = ((torch.rand(out, k // 64, generator=g) + 0.5) * 0.01).half().float()
    return quant.Int4Weight(name="model.layers.0.mlp.down_proj", source="gptq_v2", out_features=out, in_features=k,
                            group_size=64, scales=scales,
                            packed=quant.pack_int4(torch.randint(0, 16, (out, k), generator=g)),
                            zeros=torch.full((out, k // 64), 8.0))


@pytest.mark.parametrize("make", [_gguf_like_q4_0, _gptq_sym])
@pytest.mark.parametrize("rows", [1, 20])
def test_float16_scales_are_kept_in_float16_and_stay_exact(make, rows):
    g = torch.Generator().manual_seed(5)
    w = make(80, 128, g)
    p = ql.prepare_packed(w, BindContext("cpu", torch.float32))
    assert p.scales.dtype == torch.float16 and p.zeros is None and p.zero == 8.0
    assert p.nbytes == 128 * 80 // 2 + 80 * (128 // w.group_size) * 2  # codes + float16 scales only
    x = torch.randn(rows, 128, generator=g)
    ref = x.double() @ w.dequantize().double().t()  # this test's own reference, float64
    y = ql.linear_quantized_triton(x.to(DEVICE), ql.PackedQuantLinear(**{
        **p.__dict__, "codes": p.codes.to(DEVICE), "scales": p.scales.to(DEVICE)}))
    nmse = float(((y.double().cpu() - ref) ** 2).sum() / (ref ** 2).sum())
    assert nmse < 1e-12, nmse  # float32 accumulation only: the weights are decoded exactly


def test_a_swapped_nibble_order_is_caught():
    """The check can fail: high nibble first instead of low nibble first."""
    def swapped(weight, ctx):
        p = ql.prepare_packed(weight, ctx)
        return ql.PackedQuantLinear(**{**p.__dict__, "codes": (p.codes >> 4) | (p.codes << 4)})

    c = case("linear_int4", "float32", ("q4_0",), B=1, T=1, K=128, O=96, G=32)
    assert check(c, _triton(), "cuda.triton", DEVICE, prepare=swapped).status == "FAIL"


def test_group_sizes_that_are_not_a_multiple_of_16_are_refused_with_the_reason():
    g = torch.Generator().manual_seed(0)
    w = random_container(g, "linear_int8", "rtn", 8, 24, 8)
    with pytest.raises(UnsupportedOpError, match=r"cuda.linear_int8: group_size must be a multiple of 16 .*got 8 "
                                                 r"\(grid.linear_int8\)"):
        ql.prepare_packed(w, BindContext("cpu", torch.float32))
    reason = quant_kernel("linear_int8")(BindContext("cuda", torch.bfloat16, {"G": 8}))
    assert reason.startswith("cuda.linear_int8: group_size must be a multiple of 16")
    assert quant_kernel("linear_int4")(BindContext("cuda", torch.float64, {})).startswith("cuda.linear_int4: dtype")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_binds_the_quantized_kernels_above_the_dense_decoding(dtype):
    ops = bind("cuda", dtype, {"E": 1024, "F": 4096, "G": 128})
    for op in ("linear_int4", "linear_int8", "linear_ternary"):
        assert ops.record[op].impl == "cuda.triton", ops.record[op].describe()
    names = [i.qualname for i in implementations("linear_int4", "cuda")]
    assert names.index("cuda.triton") < names.index("cuda.dequant")
    fallback = bind("cuda", torch.bfloat16, {"G": 8}).record["linear_int4"]
    assert fallback.impl == "cuda.dequant" and fallback.passed_over[0][0] == "cuda.triton"


def test_leading_dims_and_a_shape_mismatch():
    g = torch.Generator().manual_seed(1)
    w = random_container(g, "linear_int4", "q4_0", 40, 64, 32)
    p = ql.prepare_packed(w, BindContext(DEVICE, torch.float32))
    x = torch.randn(2, 3, 64, generator=g).to(DEVICE)
    y = ql.linear_quantized_triton(x, p)
    assert y.shape == (2, 3, 40)
    ref = (x.float().cpu() @ w.dequantize().t())
    assert float(((y.cpu() - ref) ** 2).sum() / (ref ** 2).sum()) < 1e-10
    with pytest.raises(ValueError, match=r"x \[\.\.\., 32\] does not fit the weight \[40, 64\]"):
        ql.linear_quantized_triton(x[..., :32], p)


TRAINED = [("float16", 1), ("float32", 19)] + ([("bfloat16", 1), ("bfloat16", 19)] if DEVICE == "cuda" else [])


@pytest.mark.parametrize(("dtype", "rows"), TRAINED)
def test_the_trained_models_q4_1_and_q8_0_tensors_match_the_float32_reference(trained_gguf, dtype, rows):
    """Real Q4_1 blocks (float16 scales and mins, kept in float16: exact) and a Q8_0 slice; the
    interpreter takes the two smaller tensors only (seconds each), a GPU all of them."""
    from hal.ops import get_spec
    from quant_trained_weights import activations, trained_containers

    torch_dtype = getattr(torch, dtype)
    for w in trained_containers(str(trained_gguf)):
        if DEVICE == "cpu" and w.out_features * w.in_features > 576 * 576:
            continue
        p = ql.prepare_packed(w, BindContext(DEVICE, torch_dtype))
        assert p.scales.dtype == torch.float16 and (p.mins is None or p.mins.dtype == torch.float16)
        x = activations(w.in_features, rows).to(torch_dtype)
        y = ql.linear_quantized_triton(x.to(DEVICE), p).cpu()
        ref = x.double() @ w.dequantize().double().t()
        err = float(((y.double() - ref) ** 2).sum() / (ref ** 2).sum())
        assert err <= get_spec(w.op).tolerance(dtype), f"{w.name} {w.format} {dtype}: NMSE {err:.2e}"


@pytest.mark.parametrize("rows", [1, 17])
def test_the_launcher_reads_no_tensor_value_on_the_host(rows, monkeypatch):
    """What a CUDA graph (and a decode graph of a quantized model) needs: grid, split count and
    scratch from shapes only. ``prepare_packed`` may read values: it runs once, at bind time."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("host read of a tensor value")

    def guarded(x, weight):
        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__"):
                patch.setattr(torch.Tensor, name, refuse)
            return ql.linear_quantized_triton(x, weight)

    c = case("linear_int4", "float32", ("gptq",), B=1, T=rows, K=128, O=96, G=64)
    assert check(c, guarded, "cuda.triton (no host reads)", DEVICE, prepare=_prepare).status == "ok"
