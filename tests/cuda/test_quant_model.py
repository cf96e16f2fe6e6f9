"""Quantized checkpoints through the Triton quantized linears, whole model (GPTQ int4 symmetric and
asymmetric, ``model.quantize`` int8 and ternary, a GGUF with Q4_0 / Q4_1 / Q8_0 linears): on a GPU
the model binds cuda.triton for every quantized linear op; without one the kernels run interpreted
on CPU tensors in place of the CPU implementations (op_overrides, repacked once per container), and
the logits are as close
to the float32 reference on the same containers as the CPU's dense path of the same dequantized
weights in that dtype."""
from __future__ import annotations

import pytest
import torch
from kernel_cases import ON_GPU

import hal
from hal.ops import model_nmse_bound
from backends.cuda import quant_linear as ql
from hal.registry import BindContext
from model.synthetic import write_checkpoint

PROMPTS = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3], [900, 2, 33, 44, 55, 66, 77, 88]])


def _nmse(ref, out):
    r, o = ref.double(), out.double().cpu()
    return float(((r - o) ** 2).sum() / (r ** 2).sum())


def _interpreted_triton():
    prepared = {}

    def linear_quantized(x, weight):
        if id(weight) not in prepared:
            prepared[id(weight)] = (weight, ql.prepare_packed(weight, BindContext("cpu", x.dtype)))
        return ql.linear_quantized_triton(x, prepared[id(weight)][1])

    return linear_quantized


def _on_triton(path, dtype, quantize=None):
    """The model with every quantized linear on the Triton kernels: bound cuda.triton on a GPU,
    interpreted in place of the CPU implementations without one."""
    if ON_GPU:
        model = hal.load_model(path, "cuda", dtype, quantize=quantize)
        assert {model.bound_ops[op] for op in ql.BITS} == {"cuda.triton"}
        return model
    run = _interpreted_triton()
    return hal.load_model(path, "cpu", dtype, quantize=quantize, op_overrides={op: run for op in ql.BITS})


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", ["float32", "float16"] + (["bfloat16"] if ON_GPU else []))
def test_a_gptq_checkpoint_runs_on_the_triton_kernels(tmp_path, dtype, sym):
    path = write_checkpoint(tmp_path / "gptq", "tiny", seed=5, dtype="float32", quantize_gptq=True,
                            overrides={"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                                               "desc_act": False, "sym": sym}})
    ref = hal.load_model(path, "cpu", "float32", reference=True).logits(PROMPTS)
    base = hal.load_model(path, "cpu", dtype, quantize="dequantize").logits(PROMPTS)
    _check(_on_triton(path, dtype), ref, base, dtype)


def _check(model, ref, base, dtype):
    got = model.logits(PROMPTS.to(model.device))
    err, baseline = _nmse(ref, got), _nmse(ref, base)
    assert err <= model_nmse_bound(dtype, baseline), f"NMSE {err:.2e} vs dense {baseline:.2e}"
    assert float((got.cpu().argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.9


@pytest.fixture(scope="module")
def dense_tiny(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cudaq") / "dense", "tiny", seed=5, dtype="float32")


@pytest.mark.parametrize("args", [["--format", "int8"], ["--format", "int8", "--group-size", "32"],
                                  ["--format", "ternary"], ["--format", "ternary", "--group-size", "64"]],
                         ids=["int8-per-channel", "int8-g32", "ternary-per-row", "ternary-g64"])
@pytest.mark.parametrize("dtype", ["float32", "float16"] + (["bfloat16"] if ON_GPU else []))
def test_model_quantize_outputs_run_on_the_triton_kernels(tmp_path, dense_tiny, dtype, args):
    """int8 (W8A16) and ternary (W2A16, packed at load) checkpoints of ``python -m model.quantize``."""
    from model.quantize import main

    path = tmp_path / "q"
    assert main([str(dense_tiny), str(path)] + args) == 0
    quantize = "ternary" if "ternary" in args else None
    ref = hal.load_model(path, "cpu", "float32", reference=True).logits(PROMPTS)
    base = hal.load_model(path, "cpu", dtype, quantize="dequantize").logits(PROMPTS)
    model = _on_triton(path, dtype, quantize)
    assert {w.format.split()[1] for w in (model.layers[0].qkv, model.layers[0].down)} == \
        {"ternary" if quantize else "int8"}
    _check(model, ref, base, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"] + (["bfloat16"] if ON_GPU else []))
def test_a_gguf_with_q4_0_q4_1_and_q8_0_linears_runs_on_the_triton_kernels(tmp_path, dense_tiny, dtype):
    from llamacpp_convert import MIXED_LINEAR_TYPES, tensor_types, write_minicpm_gguf

    path = write_minicpm_gguf(dense_tiny, tmp_path / "mixed.gguf", tensor_type=tensor_types(MIXED_LINEAR_TYPES))
    ref = hal.load_model(path, "cpu", "float32", reference=True).logits(PROMPTS)
    base = hal.load_model(path, "cpu", dtype, quantize="dequantize").logits(PROMPTS)
    model = _on_triton(path, dtype)
    layer = model.layers[0]
    assert (layer.qkv.format, layer.o.format, layer.gate_up.format) == ("q4_0 int4 g32", "q8_0 int8 g32",
                                                                        "q4_1 int4 g32")
    _check(model, ref, base, dtype)
