"""A quantized checkpoint on the emulated NPU, whole model: a tiny GPTQ checkpoint loads quantized
(linear_int4 on npu_weight_quant_batchmatmul) and its bfloat16 logits are as close to the float32
reference on the same containers (dequantized exactly) as the CPU's dense bfloat16 path of the
same dequantized weights. (The trained SmolLM2 Q4_1 GGUF takes ~75 s this way, three loads of a
GGUF and the emulator decoding every weight per call: its real Q4_1 / Q8_0 tensors are checked
op by op in test_quant_npu.py instead.)"""
from __future__ import annotations

import torch

import hal
from model.synthetic import write_checkpoint
from npu_metrics import nmse

PROMPTS = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3, 64, 128, 256, 11],
                        [900, 2, 33, 44, 55, 66, 77, 88, 99, 110, 121, 132]])


def _compare(path, monkeypatch, prompts=PROMPTS):
    reference = hal.load_model(path, "cpu", "float32", reference=True)  # the containers, decoded in float32
    dense_bf16 = hal.load_model(path, "cpu", "bfloat16", quantize="dequantize")
    ref, base = reference.logits(prompts), dense_bf16.logits(prompts)
    del reference, dense_bf16
    monkeypatch.setenv("HAL_NPU_EMULATE", "1")
    npu = hal.load_model(path, "npu", "bfloat16")
    got = npu.logits(prompts)
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return nmse(ref, got), nmse(ref, base), agree, npu.bound_ops


def test_a_gptq_checkpoint_runs_on_the_fused_int4_op(emulated, monkeypatch, tmp_path):
    path = write_checkpoint(tmp_path / "gptq", "tiny", seed=3, dtype="float32", quantize_gptq=True,
                            overrides={"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                                               "desc_act": False, "sym": True}})
    err, baseline, agree, bound = _compare(path, monkeypatch)
    assert bound["linear_int4"] == "npu.torch_npu"
    assert err < 2.0 * baseline + 1e-6, f"NPU NMSE {err:.2e} vs CPU dense bf16 NMSE {baseline:.2e}"
    assert agree >= 0.9, agree

