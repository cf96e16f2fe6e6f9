"""On the emulated NPU (no ``prepare`` of a quantized token table there) a GGUF's Q8_0 token_embd is
decoded at load: the model holds the dense bfloat16 table the gguf package decodes, the lm_head is
the same tensor, and the logits are as close to the float32 judge as the CPU's."""
from __future__ import annotations

import gguf
import torch

import hal
from hal.ops import model_nmse_bound
from llamacpp_convert import write_minicpm_gguf
from model.synthetic import write_checkpoint
from npu_metrics import nmse

IDS = torch.tensor([[1, 5, 9, 200, 7, 300, 12, 1016, 44, 3, 77, 1023]])


def test_a_quantized_token_table_is_decoded_at_load_on_the_npu(emulated, tmp_path):
    folder = write_checkpoint(tmp_path / "tiny", "tiny", seed=4, dtype="float32")
    path = write_minicpm_gguf(folder, tmp_path / "embd.gguf", tensor_type=lambda name: gguf.GGMLQuantizationType[
        "Q8_0" if name.startswith("token_embd") else "F32"])
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    table = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(1024, -1).copy())
    ref = hal.load_model(path, "cpu", "float32", reference=True).logits(IDS)
    cpu = hal.load_model(path, "cpu", "bfloat16").logits(IDS)
    npu = hal.load_model(path, "npu", "bfloat16")
    assert isinstance(npu.embed, torch.Tensor) and npu.lm_head is npu.embed
    assert torch.equal(npu.embed.cpu(), table.to(torch.bfloat16))
    assert nmse(ref, npu.logits(IDS)) <= model_nmse_bound("bfloat16", nmse(ref, cpu))
