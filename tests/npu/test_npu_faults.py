"""Wrapper bugs injected on purpose (wrong mask convention, forgotten scale, wrong length
conventions, wrong sparse_mode) must be caught by the emulator-backed comparison with the
reference: each mutated call either raises in the emulator or misses the tolerance."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from backends.cpu.reference.attention import attention_decode_ref, attention_prefill_ref
from backends.npu import attention as npu_attention
from backends.npu.emulator import EmulatedOpError
from npu_metrics import mismatch

DIMS = {"TND": 128, "BSND": 64}  # the head dim each FIA layout serves (backends/npu/supports.py)
D = 64


def _prefill_inputs(dim: int = D):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 9, 4, dim, generator=g).bfloat16()
    k = torch.randn(2, 9, 2, dim, generator=g).bfloat16()
    v = torch.randn(2, 9, 2, dim, generator=g).bfloat16()
    return q, k, v, torch.tensor([0, 3]), 1 / math.sqrt(dim)


def _decode_inputs(dim: int = D):
    """B=2, T=4 against a C=256 cache holding 140 / 129 keys; huge values past each row's length."""
    g = torch.Generator().manual_seed(8)
    lens = [140, 129]
    q = torch.randn(2, 4, 4, dim, generator=g).bfloat16()
    k = torch.randn(2, 256, 2, dim, generator=g)
    v = torch.randn(2, 256, 2, dim, generator=g)
    for b, n in enumerate(lens):
        k[b, n:] *= 1e3
        v[b, n:] *= 1e3
    return q, k.bfloat16(), v.bfloat16(), torch.tensor(lens), 1 / math.sqrt(dim)


def _caught(op: str, fn, ref, args) -> bool:
    try:
        out = fn(*args)
    except EmulatedOpError:
        return True
    return mismatch(op, "o", ref(*args), out, "bfloat16") is not None


def _with_fia(monkeypatch, emulator, mutate) -> None:
    """Make the wrappers call FIA with kwargs rewritten by ``mutate`` (a simulated wrapper bug)."""
    real = emulator.npu_fused_infer_attention_score

    def fia(*args, **kwargs):
        return real(*args, **mutate(dict(kwargs)))

    proxy = SimpleNamespace(**{name: getattr(emulator, name) for name in emulator.__all__})
    proxy.npu_fused_infer_attention_score = fia
    monkeypatch.setattr(npu_attention, "torch_npu", lambda: proxy)


LAYOUTS = ("TND", "BSND")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["attention_prefill", "attention_decode"])
def test_correct_wrapper_passes(emulated, op, layout):
    fn, ref, args = _pair(op, layout)
    assert not _caught(op, fn, ref, args)


def _pair(op: str, layout: str = "TND"):
    suffix = "" if layout == "TND" else "_bsnd"
    if op == "attention_prefill":
        return getattr(npu_attention, "attention_prefill_npu" + suffix), attention_prefill_ref, \
            _prefill_inputs(DIMS[layout])
    return getattr(npu_attention, "attention_decode_npu" + suffix), attention_decode_ref, _decode_inputs(DIMS[layout])


MASK_BUGS = {
    "sdpa-convention-tril": lambda dev: torch.tril(torch.ones(2048, 2048, dtype=torch.bool, device=dev)),
    "all-false": lambda dev: torch.zeros(2048, 2048, dtype=torch.bool, device=dev),
    "triu-diagonal-0": lambda dev: torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=dev), 0),
    "seq-sized-mask": lambda dev: torch.triu(torch.ones(9, 9, dtype=torch.bool, device=dev), 1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["attention_prefill", "attention_decode"])
@pytest.mark.parametrize("bug", sorted(MASK_BUGS))
def test_wrong_mask_is_caught(emulated, monkeypatch, op, bug, layout):
    monkeypatch.setattr(npu_attention, "causal_mask", MASK_BUGS[bug])
    assert _caught(op, *_pair(op, layout))


def _per_sequence(ends: list[int]) -> list[int]:
    return [b - a for a, b in zip([0] + ends[:-1], ends)]


KWARG_BUGS = {
    "scale-forgotten (op default 1.0)": lambda kw: {k: v for k, v in kw.items() if k != "scale"},
    "scale-squared": lambda kw: dict(kw, scale=kw["scale"] ** 2),
    "top-left causal (sparse_mode=2)": lambda kw: dict(kw, sparse_mode=2),
    "no causal (sparse_mode=0, no mask)": lambda kw: dict(kw, sparse_mode=0, atten_mask=None),
    "q lengths per sequence, not cumulative": lambda kw: dict(kw, actual_seq_lengths=_per_sequence(
        kw["actual_seq_lengths"])),
    "kv heads = q heads": lambda kw: dict(kw, num_key_value_heads=kw["num_heads"]),
}


# top-left and bottom-right causal agree when q and kv lengths are equal (prefill): decode only
# (BSND takes per-batch q lengths, and none in decode: the cumulative-lengths bug is TND's alone)
KWARG_CASES = [(op, bug, layout) for bug in sorted(KWARG_BUGS) for op in ("attention_prefill", "attention_decode")
               for layout in LAYOUTS
               if not (bug.startswith("top-left") and op == "attention_prefill")
               and not (bug.startswith("q lengths") and layout == "BSND")]


@pytest.mark.parametrize(("op", "bug", "layout"), KWARG_CASES)
def test_wrong_call_is_caught(emulated, monkeypatch, op, bug, layout):
    _with_fia(monkeypatch, emulated, KWARG_BUGS[bug])
    assert _caught(op, *_pair(op, layout))


def test_cumulative_kv_lengths_with_a_paged_cache_are_caught(emulated, monkeypatch):
    def cumulative(kw):
        lens = kw["actual_seq_lengths_kv"]
        return dict(kw, actual_seq_lengths_kv=[sum(lens[:i + 1]) for i in range(len(lens))])

    _with_fia(monkeypatch, emulated, cumulative)
    assert _caught("attention_decode", *_pair("attention_decode"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reading_past_kv_lens_is_caught(emulated, monkeypatch, layout):
    """FIA told every row is as long as the longest (or as the whole capacity) reads unused slots."""
    def longest(kw):
        lens = kw["actual_seq_lengths_kv"]
        return dict(kw, actual_seq_lengths_kv=[max(lens)] * len(lens))

    _with_fia(monkeypatch, emulated, longest)
    assert _caught("attention_decode", *_pair("attention_decode", layout))
    _with_fia(monkeypatch, emulated, lambda kw: dict(kw, actual_seq_lengths_kv=[256, 256]))
    assert _caught("attention_decode", *_pair("attention_decode", layout))


def _kv_write_inputs():
    """Row 1 starts with one left-padding token (slot -1)."""
    g = torch.Generator().manual_seed(11)
    caches = [torch.randn(2, 128, 2, D, generator=g).bfloat16() for _ in range(2)]
    k, v = (torch.randn(2, 3, 2, D, generator=g).bfloat16() for _ in range(2))
    return caches[0], caches[1], k, v, torch.tensor([[0, 1, 2], [-1, 0, 1]])


def _kv_write_caught(fn) -> bool:
    from backends.cpu.reference.kv_cache import kv_write_ref

    args = _kv_write_inputs()
    expected = tuple(a.clone() for a in args)
    kv_write_ref(*expected)
    got = tuple(a.clone() for a in args)
    try:
        fn(*got)
    except EmulatedOpError:
        return True
    return any(mismatch("kv_write", name, r, o, "bfloat16") is not None
               for name, r, o in zip(("k_cache", "v_cache"), expected[:2], got[:2]))


def test_ignoring_skipped_slots_is_caught(emulated):
    """A kv_write wrapper that forgets to drop -1 slots writes row 1's padding token into flat slot
    1*C - 1, the last position of row 0: the exact comparison sees it."""

    def keeps_minus_one(k_cache, v_cache, k, v, slots):
        batch, new, kv_heads, dim = k.shape
        flat = (slots + k_cache.shape[1] * torch.arange(batch)[:, None]).reshape(-1)
        emulated.npu_scatter_pa_kv_cache(k.reshape(-1, kv_heads, dim), v.reshape(-1, kv_heads, dim),
                                         npu_attention._pages(k_cache), npu_attention._pages(v_cache), flat,
                                         cache_mode="Norm")

    assert not _kv_write_caught(npu_attention.kv_write_npu)
    assert _kv_write_caught(keeps_minus_one)


def test_swapped_swiglu_halves_are_caught(emulated, monkeypatch):
    from backends.cpu.reference.swiglu import swiglu_ref
    from backends.npu import swiglu

    g = torch.Generator().manual_seed(9)
    gate, up = torch.randn(3, 40, generator=g).bfloat16(), torch.randn(3, 40, generator=g).bfloat16()
    assert not _caught("swiglu", swiglu.swiglu_npu, swiglu_ref, (gate, up))
    monkeypatch.setattr(swiglu, "swiglu_npu", lambda a, b: emulated.npu_swiglu(torch.cat((b, a), -1)))
    assert _caught("swiglu", swiglu.swiglu_npu, swiglu_ref, (gate, up))


def test_unscaled_residual_branch_is_caught(emulated):
    from backends.cpu.reference.rms_norm import add_rms_norm_ref

    g = torch.Generator().manual_seed(10)
    x, res = torch.randn(2, 5, 60, generator=g).bfloat16(), torch.randn(2, 5, 60, generator=g).bfloat16()
    w = torch.ones(60, dtype=torch.bfloat16)
    ref = add_rms_norm_ref(x, res, w, 1e-5, 0.3)[1]
    forgot = emulated.npu_add_rms_norm(res, x, w, 1e-5)[2]  # the fused add without the branch scale
    assert mismatch("add_rms_norm", "new_residual", ref, forgot, "bfloat16") is not None
