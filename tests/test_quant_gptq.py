"""GPTQ int4 linears kept quantized (hal.quant.Int4Weight): the container decodes as the AutoGPTQ
formula written here in numpy (symmetric and asymmetric, zero rules of checkpoint_format gptq
and gptq_v2), and a GPTQ checkpoint kept quantized gives the logits of the same checkpoint
decoded at load."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hal
from model import gptq
from model.synthetic import write_checkpoint


def _autogptq_weight(parts: dict[str, torch.Tensor], offset: int) -> np.ndarray:
    """w[n, k] = scales[g, n] * (q[k, n] - (z[g, n] + offset)), g = g_idx[k]; nibbles low first."""
    qweight = parts["qweight"].numpy().view(np.uint32)
    qzeros = parts["qzeros"].numpy().view(np.uint32)
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    q = np.array([[(qweight[i // 8, j] >> (4 * (i % 8))) & 15 for j in range(n)] for i in range(k)], dtype=np.int64)
    groups = qzeros.shape[0]
    z = np.array([[(qzeros[g, j // 8] >> (4 * (j % 8))) & 15 for j in range(n)] for g in range(groups)],
                 dtype=np.int64)
    g_idx = parts["g_idx"].numpy()
    scales = parts["scales"].numpy().astype(np.float32)
    w = scales[g_idx] * (q - (z[g_idx] + offset)).astype(np.float32)
    return w.T


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("offset", [1, 0], ids=["gptq", "gptq_v2"])
def test_container_decodes_as_the_autogptq_formula(sym, offset):
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(7)) * 0.1 + (0.0 if sym else 0.03)
    parts = gptq.quantize(weight, group_size=32, offset=offset, sym=sym)
    c = gptq.container("l.weight", parts["qweight"], parts["qzeros"], parts["scales"], 32, offset)
    assert c.source == ("gptq" if offset else "gptq_v2") and c.shape == (24, 64) and c.mins is None
    want = _autogptq_weight(parts, offset)
    assert np.array_equal(c.dequantize().numpy().view(np.uint32), want.astype(np.float32).view(np.uint32))
    assert torch.equal(c.dequantize(), gptq.dequantize(parts["qweight"], parts["qzeros"], parts["scales"],
                                                       parts["g_idx"], offset))
    # round to nearest with the stored scale and zero: q = clamp(round(w / s) + z, 0, 15)
    s, z = c.scales.repeat_interleave(32, dim=1), c.zeros.repeat_interleave(32, dim=1)
    assert torch.equal(c.values().float(), torch.clamp(torch.round(weight / s) + z, 0, 15))
    if not sym:
        assert len(set(c.zeros.flatten().tolist())) > 1  # real zero points, not the symmetric 8


def test_reordered_groups_are_not_plain():
    g_idx = (torch.arange(64) // 32).to(torch.int32)
    assert gptq.plain_groups(g_idx, 32)
    assert not gptq.plain_groups(g_idx.flip(0), 32)


@pytest.fixture(scope="module")
def gptq_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("qgptq") / "g", "tiny", seed=4, dtype="float32",
                            quantize_gptq=True)


def test_a_kept_gptq_checkpoint_gives_the_logits_of_its_decoding(gptq_checkpoint):
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3]])
    kept = hal.load_model(gptq_checkpoint, "cpu", "float32")
    assert kept.layers[1].gate_up.format == "gptq int4 g128"
    assert kept.bound_ops["linear_int4"] == "cpu.dequant"  # float32: the exact decoding serves
    dense = hal.load_model(gptq_checkpoint, "cpu", "float32", quantize="dequantize")
    assert isinstance(dense.layers[1].gate_up, torch.Tensor)
    assert torch.equal(kept.logits(ids), dense.logits(ids))
    packed = hal.load_model(gptq_checkpoint, "cpu", "bfloat16")
    assert packed.bound_ops["linear_int4"] == "cpu.torch"
    assert type(packed.layers[1].gate_up.weight).__name__ == "Int4Packed"
    assert packed.logits(ids)[0, -1].argmax() == kept.logits(ids)[0, -1].argmax()
