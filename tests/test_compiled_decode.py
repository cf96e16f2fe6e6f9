"""The decode step with its decoder layers compiled by AOTInductor (model/compiled_decode.py)
against the eager path, ``model.forward`` one token at a time (the independent reference here:
the uncompiled layer code with the everyday ops).

Checked: float32 logits and cache contents within the float32 bound of the ``logits`` op
(hal/ops.py: sums may be reordered) and the same greedy tokens; bfloat16 with the int4 (Q4_0)
linears of a GGUF kept quantized: the same greedy tokens, within the bfloat16 logits bound of the
eager step, and as close to the float32 judge (the dequantized model) as the eager step is; one package per model shape, reused across steps,
capacities and step objects; ``generate(compiled=True)``; clear errors where it does not apply,
and no partial package left by a failed build. Each build takes ~10 s here (C++ compile)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import gguf
import pytest
import torch

import hal
import model.compiled_decode as compiled_decode
from hal.errors import DeviceUnavailable, InputError
from hal.ops import get_spec, model_nmse_bound
from llamacpp_convert import write_minicpm_gguf
from model.fast_decode import DecodeStep
from model.minicpm import PreparedLinear
from model.synthetic import write_checkpoint

PROMPT = [(37 * i) % 900 + 3 for i in range(20)]
STEPS = 12


@pytest.fixture(scope="module")
def aoti_cache(tmp_path_factory):
    """A cache folder of this module's own, so the packages it builds can be counted."""
    folder = tmp_path_factory.mktemp("aoti-cache")
    before = os.environ.get("HAL_CACHE_DIR")
    os.environ["HAL_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("HAL_CACHE_DIR")
    else:
        os.environ["HAL_CACHE_DIR"] = before


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("compiled") / "tiny", "tiny", seed=3, dtype="float32")


@pytest.fixture(scope="module")
def tiny_q4_0(tiny, tmp_path_factory):
    def tensor_type(name):
        if name.startswith("token_embd"):
            return gguf.GGMLQuantizationType.Q8_0
        if name.endswith(".weight") and "norm" not in name:
            return gguf.GGMLQuantizationType.Q4_0
        return gguf.GGMLQuantizationType.F32
    return write_minicpm_gguf(tiny, tmp_path_factory.mktemp("compiled") / "tiny.Q4_0.gguf", tensor_type=tensor_type)


def _nmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float((out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-300))


def _decode(model, compiled: bool | None, capacity: int = 40):
    """Prompt through forward, then STEPS greedy steps: eager forward (None) or DecodeStep."""
    cache = model.new_cache(1, capacity)
    logits, tokens = [], []
    with torch.inference_mode():
        token = model.forward(torch.tensor([PROMPT]), cache=cache, logits_last_only=True).logits[:, -1].argmax(-1)
        step = None if compiled is None else DecodeStep(model, cache, compiled=compiled)
        for _ in range(STEPS):
            if step is None:
                out = model.forward(token[:, None], cache=cache, logits_last_only=True).logits[:, -1]
            else:
                out = step.step(token)
            token = out.argmax(-1)
            logits.append(out.float())
            tokens.append(int(token))
    return torch.stack(logits), tokens, cache


def _packages(folder: Path) -> list[Path]:
    return sorted((folder / "aoti").glob("*")) if (folder / "aoti").exists() else []


def test_float32_matches_the_eager_forward(tiny, aoti_cache):
    model = hal.load_model(tiny, "cpu", "float32")
    ref_logits, ref_tokens, ref_cache = _decode(model, None)
    logits, tokens, cache = _decode(model, True)
    bound = get_spec("logits").tolerance("float32")
    assert tokens == ref_tokens
    assert _nmse(ref_logits, logits) <= bound
    length = len(PROMPT) + STEPS
    for ref_k, k, ref_v, v in zip(ref_cache.keys, cache.keys, ref_cache.values, cache.values):
        assert _nmse(ref_k[:, :length], k[:, :length]) <= bound and _nmse(ref_v[:, :length], v[:, :length]) <= bound
        assert not k[:, length:].any()  # nothing written past the last token
    assert [p.suffix for p in _packages(aoti_cache)] == [".pt2"]  # one package, no partial file


def test_one_package_serves_every_capacity_and_step_object(tiny, aoti_cache):
    model = hal.load_model(tiny, "cpu", "float32")  # a new model object: exported again, same graph
    ref_logits, ref_tokens, _ = _decode(model, None, capacity=64)
    before = _packages(aoti_cache)
    logits, tokens, _ = _decode(model, True, capacity=64)
    again, _, _ = _decode(model, True, capacity=33)
    assert tokens == ref_tokens and _nmse(ref_logits, logits) <= get_spec("logits").tolerance("float32")
    assert torch.equal(again, logits)  # the same package: bitwise the same values
    assert _packages(aoti_cache) == before and len(before) == 1


def test_int4_gguf_kept_quantized(tiny_q4_0, aoti_cache):
    model = hal.load_model(tiny_q4_0, "cpu", "bfloat16", quantize="keep")
    assert isinstance(model.layers[0].qkv, PreparedLinear) and model.bound_ops["linear_int4"] == "cpu.torch"
    judge = hal.load_model(tiny_q4_0, "cpu", "float32", reference=True)
    judge_logits, judge_tokens, _ = _decode(judge, None)
    eager, eager_tokens, _ = _decode(model, None)
    logits, tokens, _ = _decode(model, True)
    assert tokens == eager_tokens == judge_tokens
    # the bfloat16 roundings are kept (emulate_precision_casts): bitwise the eager values on the
    # machines we ran; held here to the logits contract, as float32 sums may still be reordered
    assert _nmse(eager, logits) <= get_spec("logits").tolerance("bfloat16")
    assert _nmse(judge_logits, logits) <= model_nmse_bound("bfloat16", _nmse(judge_logits, eager))
    assert _nmse(judge_logits, eager) < 1e-3


def test_generate_compiled(tiny, aoti_cache):
    model = hal.load_model(tiny, "cpu", "float32")
    plain = model.generate([PROMPT], 8, do_sample=False, eos_token_id=[])
    assert model.generate([PROMPT], 8, do_sample=False, eos_token_id=[], compiled=True) == plain


def test_where_it_does_not_apply(tiny):
    model = hal.load_model(tiny, "cpu", "float32")
    cache = model.new_cache(2, 40)
    with pytest.raises(InputError, match="batch 1"):
        DecodeStep(model, cache, compiled=True)
    with pytest.raises(InputError, match="batch 1"):
        model.generate([PROMPT, PROMPT[:5]], 4, compiled=True)
    with pytest.raises(InputError, match="use_cache=False"):
        model.generate([PROMPT], 4, compiled=True, use_cache=False)


def test_a_failed_build_leaves_no_partial_package(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path))

    def broken(program, package_path):
        Path(package_path).write_bytes(b"half a package")
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    model = hal.load_model(tiny, "cpu", "float32")
    with pytest.raises(DeviceUnavailable, match=re.escape("no C++ compiler found")):
        _decode(model, True)
    assert list((tmp_path / "aoti").iterdir()) == []
    assert model not in compiled_decode._LOADED


def test_codes_logits_without_the_packed_copy(tiny_q4_0, aoti_cache):
    """prefer={"logits": "cpu.torch"}: no packed float16 copy; the compiled step runs the Q8_0
    table's logits from its codes (compiled.codes_logits) within the bf16 bound of the eager step,
    whose logits decode the codes chunk by chunk; the bound function is checked on one row too."""
    from backends.cpu.ops import logits_cpu
    from backends.cpu.table import CodesTable
    from model.compiled_decode import CompiledCodesLogits

    model = hal.load_model(tiny_q4_0, "cpu", "bfloat16", quantize="keep", prefer={"logits": "cpu.torch"})
    assert model.head.prepared_bytes == 0 and CompiledCodesLogits.serves(model)  # the codes, no copy
    eager, eager_tokens, _ = _decode(model, None)
    logits, tokens, _ = _decode(model, True)
    assert tokens == eager_tokens
    assert _nmse(eager, logits) <= get_spec("logits").tolerance("bfloat16")
    table = model.head_weight(model.ops)
    assert isinstance(table, CodesTable)
    x = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    dense = x.float() @ table.weight.dequantize().to(torch.bfloat16).float().t()  # the table as defined
    one = CompiledCodesLogits(logits_cpu)(x, table)
    assert _nmse(dense, one) <= get_spec("logits").tolerance("float32")  # float32 sums of the same values
    cache = model.new_cache(1, 40)
    with torch.inference_mode():
        model.forward(torch.tensor([PROMPT]), cache=cache)
        assert DecodeStep(model, cache, compiled=True).bound_ops["logits"] == "compiled.codes_logits"
        assert DecodeStep(model, cache).bound_ops["logits"] == "cpu.torch"


def test_a_layers_runner_replaces_the_layer_loop(tiny):
    """model.run's layers_runner (what the compiled step passes) stands for every decoder layer: its
    output is what the logits read, and per-layer hidden states cannot come from it."""
    model = hal.load_model(tiny, "cpu", "float32")
    ids = torch.tensor([PROMPT[:3]])
    model.rope.ensure(3)
    rope = model.rope.lookup(torch.arange(3)[None])
    calls = []

    def zeros(x, residual):
        calls.append(x.shape)
        return torch.zeros_like(x), residual

    with torch.inference_mode():
        out = model.run(model.ops, ids, rope, None, None, False, None, None, layers_runner=zeros)
        assert calls == [(1, 3, model.config.hidden_size)] and not out.logits.any()
        with pytest.raises(InputError, match="no per-layer hidden states"):
            model.run(model.ops, ids, rope, None, None, False, None, None, output_hidden_states=True,
                      layers_runner=zeros)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_attention_matches_float64_attention(dtype):
    """compiled_decode.attention_one_row (the traced layers' attention on AVX-512 CPUs) against
    softmax(q k^T * scale) v in float64 with grouped heads, within the attention_decode bounds."""
    torch.manual_seed(0)
    heads, kv_heads, dim, length = 6, 2, 16, 37
    q = torch.randn(1, 1, heads, dim).to(dtype)
    k, v = torch.randn(1, length, kv_heads, dim).to(dtype), torch.randn(1, length, kv_heads, dim).to(dtype)
    group = heads // kv_heads
    kk = k.double()[0].repeat_interleave(group, dim=1)  # [L, H, D]: head h reads kv head h // group
    vv = v.double()[0].repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q.double()[0, 0], kk) * 0.25
    want = torch.einsum("hl,lhd->hd", scores.softmax(-1), vv)[None, None]
    got = compiled_decode.attention_one_row(q, k, v, 0.25)
    assert got.dtype == dtype and got.shape == q.shape
    assert _nmse(want, got) <= get_spec("attention_decode").tolerance("float32" if dtype == torch.float32 else "bfloat16")


def test_the_sdpa_and_one_row_forms_of_the_layers_agree(tiny, tmp_path, monkeypatch):
    """Both attention forms of the traced layers (compiled_decode.ONE_ROW_ATTENTION_ON picks one by
    CPU) build, and decode within the float32 logits bound of the eager forward."""
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path))
    model = hal.load_model(tiny, "cpu", "float32")
    ref_logits, ref_tokens, _ = _decode(model, None)
    for capability in ("AVX2", "AVX512"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        compiled_decode._LOADED.pop(model, None)
        logits, tokens, _ = _decode(model, True)
        assert tokens == ref_tokens and _nmse(ref_logits, logits) <= get_spec("logits").tolerance("float32")
    assert len(_packages(tmp_path)) == 2  # two graphs: the SDPA call and the one-row form
