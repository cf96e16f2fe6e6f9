"""Quantized checkpoints on the emulated NPU, whole model: tiny GPTQ (symmetric and asymmetric),
``model.quantize`` int8 / ternary and GGUF Q4_0 / Q4_1 / Q8_0 checkpoints load quantized (linear_int4 /
linear_int8 on npu_weight_quant_batchmatmul, ternary unpacked on the device) and their bfloat16
logits are as close to the float32
reference on the same containers (dequantized exactly) as the CPU's dense bfloat16 path of the
same dequantized weights. (The trained SmolLM2 Q4_1 GGUF takes ~75 s this way, three loads of a
GGUF and the emulator decoding every weight per call: its real Q4_1 / Q8_0 tensors are checked
op by op in test_quant_npu.py instead.)"""
from __future__ import annotations

import pytest
import torch

import hal
from hal.ops import model_nmse_bound
from model.checkpoint import SINGLE
from model.safetensors_mmap import SafetensorsFile
from model.synthetic import write_checkpoint
from npu_metrics import nmse

PROMPTS = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3, 64, 128, 256, 11],
                        [900, 2, 33, 44, 55, 66, 77, 88, 99, 110, 121, 132]])


def _gptq_tiny(tmp_path, group=32, sym=True, checkpoint_format="gptq"):
    return write_checkpoint(tmp_path / f"gptq{group}{sym}{checkpoint_format}", "tiny", seed=3, dtype="float32",
                            quantize_gptq=True,
                            overrides={"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": group,
                                                               "desc_act": False, "sym": sym,
                                                               "checkpoint_format": checkpoint_format}})


def _compare(path, monkeypatch, prompts=PROMPTS, quantize=None):
    """(NPU NMSE, CPU dense bfloat16 NMSE, top-1 agreement, the NPU's bound ops): both against the
    float32 reference on the same weights (quantized containers decoded exactly; a ternary
    checkpoint's fake-quantized values as stored). ``quantize``: the NPU load's mode."""
    reference = hal.load_model(path, "cpu", "float32", reference=True)  # the containers, decoded in float32
    dense_bf16 = hal.load_model(path, "cpu", "bfloat16", quantize="dequantize")
    ref, base = reference.logits(prompts), dense_bf16.logits(prompts)
    del reference, dense_bf16
    monkeypatch.setenv("HAL_NPU_EMULATE", "1")
    npu = hal.load_model(path, "npu", "bfloat16", quantize=quantize)
    got = npu.logits(prompts)
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return nmse(ref, got), nmse(ref, base), agree, npu.bound_ops


@pytest.mark.parametrize("sym,checkpoint_format", [(True, "gptq"), (False, "gptq"), (False, "gptq_v2")])
def test_a_gptq_checkpoint_runs_on_the_fused_int4_op(emulated, monkeypatch, tmp_path, sym, checkpoint_format):
    """Asymmetric too: the zero point reaches CANN's ``(weight + antiquant_offset) * antiquant_scale``
    negated (an un-negated offset fails this bound: test_quant_npu.py holds the op to it)."""
    path = _gptq_tiny(tmp_path, sym=sym, checkpoint_format=checkpoint_format)
    if not sym:
        assert len(torch.unique(SafetensorsFile(path / SINGLE).tensor(
            "model.layers.0.mlp.down_proj.qzeros"))) > 1  # real zero points, not 8 everywhere
    err, baseline, agree, bound = _compare(path, monkeypatch)
    assert bound["linear_int4"] == "npu.torch_npu"
    assert err <= model_nmse_bound("bfloat16", baseline), f"NPU NMSE {err:.2e} vs CPU dense bf16 NMSE {baseline:.2e}"
    assert agree >= 0.9, agree



def test_a_group_size_the_fused_op_refuses_binds_the_dequant_path_with_the_reason(emulated, monkeypatch, tmp_path):
    """The binding sees the checkpoint's group size (hal.api rebinds with G after reading the
    weights): group 16 is below npu_weight_quant_batchmatmul's 32, so linear_int4 is served by
    npu.dequant and the record says why, instead of the fused op's prepare failing at load."""
    path = _gptq_tiny(tmp_path, group=16)
    err, baseline, agree, bound = _compare(path, monkeypatch)
    assert bound["linear_int4"] == "npu.dequant"
    assert err <= model_nmse_bound("bfloat16", baseline), f"NPU NMSE {err:.2e} vs CPU dense bf16 NMSE {baseline:.2e}"
    record = hal.load_model(path, "npu", "bfloat16").ops.record["linear_int4"]
    assert any(q == "npu.torch_npu" and "got 16" in why for q, why in record.passed_over), record.passed_over


def test_decode_graph_replays_the_fused_int4_op_as_eager_decode_runs_it(emulated, monkeypatch, tmp_path):
    """A quantized model's decode steps replayed from the emulated NPUGraph: the fused int4 op inside
    the graph, every step's logits equal to the same model's eager decode steps."""
    from model.decode_graph import DecodeGraph

    monkeypatch.setenv("HAL_NPU_EMULATE", "1")
    npu = hal.load_model(_gptq_tiny(tmp_path), "npu", "bfloat16")
    prompt = PROMPTS[:1]
    eager_cache, graph_cache = npu.new_cache(1, 32), npu.new_cache(1, 32)
    eager = npu.forward(prompt, cache=eager_cache, logits_last_only=True).logits[:, -1]
    npu.forward(prompt, cache=graph_cache, logits_last_only=True)
    graph = DecodeGraph(npu, graph_cache)
    assert graph.bound_ops["linear_int4"] == "npu.torch_npu"
    for _ in range(4):
        token = eager.float().argmax(-1)
        eager = npu.forward(token.view(1, 1), cache=eager_cache, logits_last_only=True).logits[:, -1]
        replayed = graph.step(token).clone()
        assert torch.equal(replayed.float(), eager.float())
    assert graph.captured


def test_decode_graph_refuses_a_weight_prepared_for_another_implementation(emulated, monkeypatch, tmp_path):
    """A linear prepared at load for an implementation the graph does not bind (here an override: the
    container itself) would reach the graph's kernel in the wrong layout: refused, naming both."""
    from hal.errors import UnsupportedOpError
    from backends.cpu.reference.linear import quantized_linear_ref
    from model.decode_graph import DecodeGraph

    monkeypatch.setenv("HAL_NPU_EMULATE", "1")
    npu = hal.load_model(_gptq_tiny(tmp_path), "npu", "bfloat16", op_overrides={"linear_int4": quantized_linear_ref})
    with pytest.raises(UnsupportedOpError, match="linear_int4 was prepared for override at load.*npu.torch_npu"):
        DecodeGraph(npu, npu.new_cache(1, 32))


@pytest.fixture(scope="module")
def dense_tiny(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("npuq") / "dense", "tiny", seed=3, dtype="float32")


@pytest.mark.parametrize("args,op", [(["--format", "int8"], "linear_int8"),
                                     (["--format", "int8", "--group-size", "32"], "linear_int8"),
                                     (["--format", "ternary"], "linear_ternary")],
                         ids=["int8-per-channel", "int8-g32", "ternary"])
def test_model_quantize_outputs_run_quantized_on_the_npu(emulated, monkeypatch, tmp_path, dense_tiny, args, op):
    """``python -m model.quantize`` int8 (per channel, groups of 32) and ternary checkpoints, whole
    model, kept quantized on the emulated NPU (ternary: packed at load, unpacked to bfloat16 on the
    device): as close to the float32 reference as the CPU's dense bfloat16."""
    from model.quantize import main

    path = tmp_path / "q"
    assert main([str(dense_tiny), str(path)] + args) == 0
    err, baseline, agree, bound = _compare(path, monkeypatch, quantize="ternary" if op == "linear_ternary" else None)
    assert bound[op].startswith("npu."), bound[op]
    assert err <= model_nmse_bound("bfloat16", baseline), f"NPU NMSE {err:.2e} vs CPU dense bf16 NMSE {baseline:.2e}"
    assert agree >= 0.9, agree


def test_a_gguf_with_q4_0_q4_1_and_q8_0_linears_runs_quantized_on_the_npu(emulated, monkeypatch, tmp_path,
                                                                          dense_tiny):
    """GGUF Q4_0 / Q4_1 (int4 with mins) / Q8_0 (int8 in groups of 32) linears kept quantized, whole
    model on the emulated NPU: every linear a prepared quantized op, logits within the model bound."""
    from llamacpp_convert import MIXED_LINEAR_TYPES, tensor_types, write_minicpm_gguf

    path = write_minicpm_gguf(dense_tiny, tmp_path / "mixed.gguf", tensor_type=tensor_types(MIXED_LINEAR_TYPES))
    err, baseline, agree, bound = _compare(path, monkeypatch)
    monkeypatch.setenv("HAL_NPU_EMULATE", "1")
    layer = hal.load_model(path, "npu", "bfloat16").layers[0]
    assert (layer.qkv.format, layer.o.format, layer.gate_up.format) == ("q4_0 int4 g32", "q8_0 int8 g32",
                                                                        "q4_1 int4 g32")
    assert all(w.impl.startswith("npu.") for w in (layer.qkv, layer.o, layer.gate_up, layer.down))
    assert err <= model_nmse_bound("bfloat16", baseline), f"NPU NMSE {err:.2e} vs CPU dense bf16 NMSE {baseline:.2e}"
    assert agree >= 0.9, agree
