"""Binding: one resolution per model, a record of who serves each op and why others did not."""
from __future__ import annotations

import pytest
import torch

from hal import registry
from hal.errors import UnsupportedOpError
from hal.ops import CATALOGUE
from backends.cpu import QUANTIZED_LINEARS
from hal.registry import BindContext, Binding, Impl, bind
from expected_bindings import float32_cpu_linear

SHAPES = {"E": 64, "F": 128, "V": 100, "H": 4, "Hk": 2, "D": 16}


def test_cpu_binds_torch_ops_and_reference_mode_binds_the_judge():
    ops = bind("cpu", torch.float32, SHAPES)
    assert set(ops.record) == set(CATALOGUE)
    dense = {op: b for op, b in ops.record.items() if op not in QUANTIZED_LINEARS}
    assert {b.impl for op, b in dense.items() if op not in ("linear", "logits")} == {"cpu.torch"}
    # float32 dense linears: oneDNN on the [O, K] weights, the pre-transposed GEMM where oneDNN is slower
    assert ops.record["linear"].impl == float32_cpu_linear()
    assert ops.record["logits"].impl == "cpu.onednn"  # float32 lm_head: oneDNN on the [V, E] table
    assert all(("cpu.reference", "the reference is the judge only") in b.passed_over
               for b in ops.record.values())
    ref = bind("cpu", torch.float32, SHAPES, reference=True)
    assert {b.impl for b in ref.record.values()} == {"cpu.reference"}
    assert ref.rms_norm.__module__ == "backends.cpu.reference.rms_norm"


def test_disabled_backend_is_strict_by_default_and_falls_back_when_allowed(monkeypatch):
    monkeypatch.setenv("HAL_DISABLE_BACKENDS", "cuda")
    with pytest.raises(UnsupportedOpError) as err:
        bind("cuda", torch.bfloat16, SHAPES)
    message = str(err.value)
    assert "rms_norm (cuda.torch: disabled by HAL_DISABLE_BACKENDS)" in message
    assert "--allow-fallback" in message
    with pytest.warns(UserWarning, match="op rms_norm runs on the CPU reference"):
        ops = bind("cuda", torch.bfloat16, SHAPES, allow_fallback=True)
    binding = ops.record["rms_norm"]
    assert binding.fallback and binding.impl == "cpu.reference"
    x, w = torch.randn(3, 64), torch.ones(64)
    # the fallback moves tensors to the CPU and back to the bound device; on CPU tensors it is exact
    ops_cpu = ops.rms_norm.__wrapped__(x, w, 1e-6)
    assert torch.allclose(ops_cpu, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_supports_reasons_are_recorded_and_priorities_respected(monkeypatch):
    impls = list(registry._IMPLS)
    monkeypatch.setattr(registry, "_IMPLS", impls)

    def only_big_heads(ctx: BindContext) -> str | None:
        return None if ctx.shapes["D"] >= 64 else f"cpu.fancy: head_dim must be >= 64, got {ctx.shapes['D']}"

    registry.register(Impl("attention_decode", "cpu", "fancy", "backends.cpu.ops:attention_decode_cpu",
                           supports=only_big_heads, priority=-1))
    ops = bind("cpu", torch.float32, SHAPES)
    assert ops.record["attention_decode"].impl == "cpu.torch"
    assert (("cpu.fancy", "cpu.fancy: head_dim must be >= 64, got 16")
            in ops.record["attention_decode"].passed_over)
    ops = bind("cpu", torch.float32, {**SHAPES, "D": 128})
    assert ops.record["attention_decode"].impl == "cpu.fancy"
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Impl("attention_decode", "cpu", "fancy", "x:y"))
    with pytest.raises(KeyError, match="not in the catalogue"):
        registry.register(Impl("conv2d", "cpu", "x", "x:y"))


def test_overrides_are_recorded():
    def broken(x, weight, eps):
        return x

    ops = bind("cpu", torch.float32, SHAPES, overrides={"rms_norm": broken})
    assert ops.rms_norm is broken
    assert ops.record["rms_norm"].impl == "override"


def test_with_impls_swaps_the_named_ops_and_keeps_the_rest():
    ops = bind("cpu", torch.float32, SHAPES)
    marker = Binding("rotary", "cpu.test", False, ())
    swapped = ops.with_impls({"rotary": (len, marker)})
    assert swapped.rotary is len and swapped.record["rotary"] is marker
    assert ops.rotary is not len and ops.record["rotary"].impl == "cpu.torch"  # the original is untouched
    assert swapped.linear is ops.linear and swapped.record["linear"] == ops.record["linear"]
    with pytest.raises(KeyError, match="not bound"):
        ops.with_impls({"no_such_op": (len, marker)})
