"""A GPTQ checkpoint through the Triton quantized linears, whole model: on a GPU the model binds
cuda.triton for linear_int4; without one the kernels run interpreted on CPU tensors in place of
the CPU implementation (op_overrides, repacked once per container), and the logits are as close
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

    def linear_int4(x, weight):
        if id(weight) not in prepared:
            prepared[id(weight)] = ql.prepare_packed(weight, BindContext("cpu", x.dtype))
        return ql.linear_quantized_triton(x, prepared[id(weight)])

    return linear_int4


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", ["float32", "float16"] + (["bfloat16"] if ON_GPU else []))
def test_a_gptq_checkpoint_runs_on_the_triton_kernels(tmp_path, dtype, sym):
    path = write_checkpoint(tmp_path / "gptq", "tiny", seed=5, dtype="float32", quantize_gptq=True,
                            overrides={"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                                               "desc_act": False, "sym": sym}})
    ref = hal.load_model(path, "cpu", "float32", reference=True).logits(PROMPTS)
    base = hal.load_model(path, "cpu", dtype, quantize="dequantize").logits(PROMPTS)
    if ON_GPU:
        model = hal.load_model(path, "cuda", dtype)
        assert model.bound_ops["linear_int4"] == "cuda.triton"
    else:
        model = hal.load_model(path, "cpu", dtype, op_overrides={"linear_int4": _interpreted_triton()})
    got = model.logits(PROMPTS.to(model.device))
    err, baseline = _nmse(ref, got), _nmse(ref, base)
    assert err <= model_nmse_bound(dtype, baseline), f"NMSE {err:.2e} vs dense {baseline:.2e}"
    assert float((got.cpu().argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.9
