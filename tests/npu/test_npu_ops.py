"""The dense ops through the NPU backend on the emulator == the float32 CPU reference, on cases
at the NPU's own edges, for every NPU implementation and catalogue dtype (unsupported
combinations skip with the implementation's own reason)."""
from __future__ import annotations

import math

import pytest
import torch

from hal.ops import CATALOGUE
from hal.registry import BindContext, implementations
from npu_metrics import assert_close

SHAPES = {"E": 60, "F": 96, "V": 50, "H": 4, "Hk": 2, "D": 64}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _reference(op: str):
    return next(i for i in implementations(op, "cpu") if i.name == "reference").load()


def _rope(batch: int, new: int, dim: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    pos = torch.arange(offset, offset + new).float()[None].expand(batch, new)
    emb = torch.cat((pos[..., None] * inv, pos[..., None] * inv), dim=-1)
    return emb.cos(), emb.sin()  # unscaled: npu_rotary_mul takes r1/r2 in [-1, 1]


def _cases(op: str, dt: torch.dtype) -> list[tuple[str, tuple]]:
    """(id, positional args) per op; seeded, odd sizes, left padding where the op takes it."""
    g = torch.Generator().manual_seed(42)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    e, f, h, hk, d = SHAPES["E"], SHAPES["F"], SHAPES["H"], SHAPES["Hk"], SHAPES["D"]
    if op == "embedding":
        return [("B2-T7", (torch.randint(0, 50, (2, 7), generator=g), rnd(50, e)))]
    if op == "rms_norm":
        weight = (1 + 0.1 * torch.randn(e, generator=g)).to(dt)
        return [("B2-T7-E60", (rnd(2, 7, e, scale=3.0), weight, 1e-5))]
    if op == "add_rms_norm":
        w = (1 + 0.1 * torch.randn(e, generator=g)).to(dt)
        return [("B2-T7-E60-s0.35", (rnd(2, 7, e), rnd(2, 7, e, scale=4.0), w, 1e-5, 0.35)),
                ("B1-T3-E60-s1", (rnd(1, 3, e), rnd(1, 3, e), w, 1e-6, 1.0))]
    if op == "rotary":
        cos, sin = _rope(2, 7, d, offset=1000)
        return [("B2-T7-H4-D64", (rnd(2, 7, h, d), rnd(2, 7, hk, d), cos, sin))]
    if op == "swiglu":
        return [("B2-T7-F96", (rnd(2, 7, f, scale=2.0), rnd(2, 7, f)))]
    if op == "linear":
        return [("B2-T7-K60-O36", (rnd(2, 7, e), rnd(36, e, scale=e ** -0.5)))]
    if op == "logits":
        return [("B2-T7-E60-V1500", (rnd(2, 7, e, scale=4.0), rnd(1500, e, scale=0.02)))]
    scale = 1 / math.sqrt(d)
    if op == "attention_prefill":
        return [(f"B2-T9-H4-Hk2-D64-start{s}", (rnd(2, 9, h, d), rnd(2, 9, hk, d), rnd(2, 9, hk, d),
                                                 None if s is None else torch.tensor(s), scale))
                for s in (None, [0, 3], [9, 2])]
    if op == "attention_decode":
        cases = []
        for new, lens in ((1, [150, 150]), (1, [150, 20]), (5, [2, 147]), (3, [256, 9]), (4, [1, 1])):
            name = f"B2-T{new}-C256-kv_lens{lens}"
            cases.append((name, (rnd(2, new, h, d), _ragged(rnd(2, 256, hk, d), lens),
                                 _ragged(rnd(2, 256, hk, d), lens), torch.tensor(lens), scale)))
        return cases
    if op == "kv_write":
        cases = []
        for name, slots in (("decode", [[150], [7]]), ("chunk", [[130, 131, 132], [253, 254, 255]]),
                            ("prefill-padded", [[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]])):
            new = len(slots[0])
            cases.append((name, (rnd(2, 256, hk, d), rnd(2, 256, hk, d), rnd(2, new, hk, d),
                                 rnd(2, new, hk, d), torch.tensor(slots))))
        return cases
    raise KeyError(op)


def _ragged(cache: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """Huge values past each row's length: reading an unused position fails the comparison."""
    for b, n in enumerate(lens):
        cache[b, n:] = 1e3 * torch.randn(cache[b, n:].shape, generator=torch.Generator().manual_seed(b))
    return cache


def _run(op: str, fn, args: tuple):
    """The op's outputs as a tuple: its return value, or for an in-place op the written arguments
    (on a fresh copy of them, so that each call starts from the same caches)."""
    if not CATALOGUE[op].inplace:
        return fn(*args)
    copies = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    assert fn(*copies) is None, f"{op} is in place and returns None"
    return copies[:len(CATALOGUE[op].outputs)]


# the dense ops, with cases at the NPU's own edges (128-token pages, chunked decode, left padding);
# every NPU implementation of every op also runs the shared grid (test_npu_grid.py)
DENSE_OPS = ["embedding", "rms_norm", "add_rms_norm", "rotary", "swiglu", "linear", "logits", "attention_prefill",
             "attention_decode", "kv_write"]
PARAMS = [
    pytest.param(op, impl, dtype, id=f"{op}-{impl.qualname}-{dtype}")
    for op in DENSE_OPS for impl in implementations(op, "npu") for dtype in CATALOGUE[op].dtypes
]


@pytest.mark.parametrize(("op", "impl", "dtype"), PARAMS)
def test_op_matches_reference(emulated, op, impl, dtype):
    reason = impl.supports(BindContext("npu", DTYPES[dtype], SHAPES))
    if reason is not None:
        pytest.skip(reason)
    fn, ref = impl.load(), _reference(op)
    for case, args in _cases(op, DTYPES[dtype]):
        expected, got = _run(op, ref, args), _run(op, fn, args)
        if not isinstance(expected, tuple):
            expected, got = (expected,), (got,)
        for name, r, o in zip(CATALOGUE[op].outputs, expected, got):
            assert o.dtype == r.dtype, f"{op} {case}: {name} dtype {o.dtype} != {r.dtype}"
            assert_close(op, name, r, o, dtype, case)


def test_fused_attention_binds_for_its_shapes_and_reports_why_not(emulated, monkeypatch):
    """TND for head dim 128, BSND for 64 (with TND's reason in the record), plain torch for float32;
    HAL_NPU_FIA_LAYOUT forces one layout (the runbook measures both)."""
    from hal.errors import InputError
    from hal.registry import bind

    d128 = bind("npu", torch.bfloat16, dict(SHAPES, D=128))
    assert d128.record["attention_prefill"].impl == d128.record["attention_decode"].impl == "npu.torch_npu"
    d64 = bind("npu", torch.bfloat16, SHAPES)
    assert d64.record["attention_decode"].impl == d64.record["attention_prefill"].impl == "npu.torch_npu_bsnd"
    assert "head_dim must be 128 or 192 for FIA TND" in dict(d64.record["attention_decode"].passed_over)[
        "npu.torch_npu"]
    fp32 = bind("npu", torch.float32, SHAPES)
    assert fp32.record["attention_prefill"].impl == "npu.torch"
    assert ("npu.torch_npu", "npu.attention_prefill: dtype must be bfloat16 or float16 (FIA), got float32") \
        in fp32.record["attention_prefill"].passed_over
    d24 = bind("npu", torch.bfloat16, dict(SHAPES, D=24))
    assert "multiple of 16 up to 512 for FIA BSND, got 24" in d24.record["attention_decode"].describe()
    monkeypatch.setenv("HAL_NPU_FIA_LAYOUT", "BSND")
    assert bind("npu", torch.bfloat16, dict(SHAPES, D=128)).record["attention_decode"].impl == "npu.torch_npu_bsnd"
    monkeypatch.setenv("HAL_NPU_FIA_LAYOUT", "TND")
    forced = bind("npu", torch.bfloat16, SHAPES).record["attention_decode"]
    assert forced.impl == "npu.torch" and "HAL_NPU_FIA_LAYOUT=TND" in forced.describe()
    monkeypatch.setenv("HAL_NPU_FIA_LAYOUT", "NZ")
    with pytest.raises(InputError, match="HAL_NPU_FIA_LAYOUT must be TND or BSND, got 'NZ'"):
        bind("npu", torch.bfloat16, SHAPES)


# -- sample -------------------------------------------------------------------------------------

def _sample_impl():
    (impl,) = implementations("sample", "npu")
    return impl.load()


def test_sample_greedy_is_exact(emulated):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1.0  # tie: lowest index wins
    expected = _reference("sample")(logits, 0.0, 0, 1.0, None)
    assert torch.equal(_sample_impl()(logits, 0.0, 0, 1.0, None), expected)


def _kept(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> set[int]:
    """Independent statement of the catalogue rule for one row: top_k, then top_p (kept while the
    mass strictly above a token is < top_p)."""
    probs = torch.softmax(row.double() / temperature, dim=0)
    order = torch.argsort(probs, descending=True, stable=True).tolist()
    if top_k:
        order = order[:top_k]
    kept, above = [], 0.0
    for token in order:
        if above >= top_p:
            break
        kept.append(token)
        above += float(probs[token])
    return set(kept)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 0.6), (0.7, 5, 1.0), (1.3, 0, 1.0)])
def test_sample_draws_follow_the_reference_distribution(emulated, temperature, top_k, top_p):
    row = torch.randn(40, generator=torch.Generator().manual_seed(3)) * 1.5
    logits = row.expand(20000, 40).contiguous()
    got = _sample_impl()(logits, temperature, top_k, top_p, torch.Generator().manual_seed(5))
    kept = _kept(row, temperature, top_k, top_p)
    assert set(got.tolist()) <= kept
    exact = torch.zeros(40, dtype=torch.float64)
    exact[list(kept)] = torch.softmax(row.double() / temperature, dim=0)[list(kept)]
    exact /= exact.sum()
    freq = torch.bincount(got, minlength=40).double() / got.numel()
    assert 0.5 * float((freq - exact).abs().sum()) < 0.04  # total variation distance; noise ~0.015
    again = _sample_impl()(logits, temperature, top_k, top_p, torch.Generator().manual_seed(5))
    assert torch.equal(got, again), "a seeded generator must make sampling deterministic"


def test_sample_draws_its_noise_on_the_device_with_the_request_generator(emulated, monkeypatch):
    """The exponential noise is drawn in place on the tensor the probabilities live on (the NPU),
    from the request's generator when it has one, from the device's default generator otherwise.
    Emulated, the device is the CPU: the mirror of a host generator on a real NPU is unverified."""
    from backends.npu import sample

    drawn = []
    real = torch.Tensor.exponential_
    monkeypatch.setattr(torch.Tensor, "exponential_",
                        lambda self, *a, generator=None, **k: (drawn.append((self.shape, self.device, generator)),
                                                               real(self, *a, generator=generator, **k))[1])
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    seeded = torch.Generator().manual_seed(11)
    first = sample.sample_npu(logits, 0.8, 10, 0.9, seeded)
    from backends.npu.runtime import device

    assert drawn == [((3, 50), device(), seeded)]  # one draw, on the probabilities' device
    assert torch.equal(first, sample.sample_npu(logits, 0.8, 10, 0.9, torch.Generator().manual_seed(11)))
    torch.manual_seed(5)
    unseeded = sample.sample_npu(logits, 0.8, 10, 0.9, None)
    torch.manual_seed(5)
    assert torch.equal(unseeded, sample.sample_npu(logits, 0.8, 10, 0.9, None)) and drawn[-1][2] is None
    assert sample.device_generator(None, torch.device("cpu")) is None
    assert sample.device_generator(seeded, torch.device("cpu")) is seeded
