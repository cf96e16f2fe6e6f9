"""A GGUF's quantized token table (token_embd Q8_0 / Q4_0 / Q4_1, tied lm_head) kept as its codes
(hal/ops.py "Quantized token tables", model/table.py, backends/cpu/table.py).

The independent reference is the ``gguf`` package: the file's token_embd bytes read with
``gguf.GGUFReader`` and decoded by ``gguf.quants.dequantize`` (numpy), cast to the model dtype:
the dense table a dequantizing load holds (what the model held before). Checked: the lookup is
bitwise that table's rows; the logits of both CPU paths (cpu.fbgemm's packed float16, cpu.torch's
chunked float32) are bitwise those of the same model holding that table dense, and within the
``logits`` contract of the float32 reference on it; the model holds the codes and no dense
`[V, E]` table; a whole model's logits against the dequantized float32 judge."""
from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch

import hal
from backends.cpu.ops import embedding_cpu
from backends.cpu.reference.linear import logits_ref
from hal.ops import get_spec, model_nmse_bound
from llamacpp_convert import write_minicpm_gguf
from model.synthetic import write_checkpoint
from model.table import PreparedTable
from model.tp import weight_bytes
from validation import quantization

KINDS = ("Q8_0", "Q4_0", "Q4_1")
LINEARS = {"attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q4_0", "attn_output": "Q4_0", "ffn_gate": "Q4_0",
           "ffn_up": "Q4_0", "ffn_down": "Q4_0"}
IDS = torch.tensor([[1, 5, 9, 200, 7, 300, 12, 1016, 44, 3, 77, 1023]])
LONG = torch.arange(40).reshape(2, 20) * 25 + 3  # 40 rows: above cpu.fbgemm's 16-row packed GEMM


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("qtable") / "tiny", "tiny", seed=4, dtype="float32")


def _tensor_type(embedding: str):
    def tensor_type(name):
        if name.startswith("token_embd"):
            return gguf.GGMLQuantizationType[embedding]
        for part, kind in LINEARS.items():
            if f".{part}." in name:
                return gguf.GGMLQuantizationType[kind]
        return gguf.GGMLQuantizationType.F32
    return tensor_type


@pytest.fixture(scope="module")
def ggufs(tiny_f32, tmp_path_factory):
    root = tmp_path_factory.mktemp("qtable")
    return {kind: write_minicpm_gguf(tiny_f32, root / f"embd_{kind}.gguf", tensor_type=_tensor_type(kind))
            for kind in KINDS}


def gguf_table(path) -> torch.Tensor:
    """token_embd `[V, E]` float32 as the gguf package decodes it (the reference of every test here)."""
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    rows = int(tensor.shape[1])
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(rows, -1).copy())


def _nmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((ref - out).double().pow(2).sum() / ref.double().pow(2).sum())


def _dense_tensors(obj, seen=None):
    """Every torch.Tensor reachable through dataclass fields / attributes of ``obj`` (shallow graph)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    fields = [getattr(obj, f.name) for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
    return [t for value in fields for t in _dense_tensors(value, seen)]


@pytest.mark.parametrize("kind", KINDS)
def test_rows_decode_bitwise_as_the_gguf_package(ggufs, kind):
    model = hal.load_model(ggufs[kind], "cpu", "bfloat16")
    table = model.embed
    assert isinstance(table, PreparedTable) and model.lm_head is table
    assert table.format.startswith(kind.lower()) and table.shape == (1024, 128)
    want = gguf_table(ggufs[kind])
    index = torch.tensor([1023, 0, 7, 7, 512])
    assert torch.equal(table.container.dequantize_rows(index).view(torch.int32), want[index].view(torch.int32))
    assert torch.equal(table.container.dequantize_rows(slice(100, 300)).view(torch.int32),
                       want[100:300].view(torch.int32))


@pytest.mark.parametrize("kind", KINDS)
def test_lookup_is_bitwise_the_dense_table(ggufs, kind):
    model = hal.load_model(ggufs[kind], "cpu", "bfloat16")
    got = model.ops.embedding(IDS, model.embed_weight(model.ops))
    want = gguf_table(ggufs[kind]).to(torch.bfloat16)[IDS]
    assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("logits", ["cpu.fbgemm", "cpu.torch"])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_of_the_codes(ggufs, kind, logits):
    """Both logits paths over the codes: bitwise the logits of the same model holding the dense
    table (an embedding without a prepare gets it decoded at load: the cuda / npu path), for 12
    and 40 rows (cpu.fbgemm: its packed GEMM, and its chunked path above 16 rows); and, op by op,
    within the ``logits`` contract of the float32 reference on the dense table."""
    prefer = {"logits": logits}
    model = hal.load_model(ggufs[kind], "cpu", "bfloat16", prefer=prefer)
    dense = hal.load_model(ggufs[kind], "cpu", "bfloat16", prefer=prefer, op_overrides={"embedding": embedding_cpu})
    assert isinstance(model.embed, PreparedTable) and isinstance(dense.embed, torch.Tensor)
    assert model.bound_ops["logits"] == logits and model.head.impl == logits
    for ids in (IDS, LONG):
        assert torch.equal(model.logits(ids), dense.logits(ids))
    table = gguf_table(ggufs[kind]).to(torch.bfloat16)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for rows in (x[:1], x.repeat(8, 1)):  # 1 and 24 rows
        nmse = _nmse(logits_ref(rows, table), model.ops.logits(rows, model.head_weight(model.ops)))
        assert nmse <= get_spec("logits").tolerance("bfloat16"), nmse


@pytest.mark.parametrize("logits", ["cpu.fbgemm", "cpu.torch"])
def test_the_model_holds_the_codes_not_a_dense_table(ggufs, logits):
    model = hal.load_model(ggufs["Q8_0"], "cpu", "bfloat16", prefer={"logits": logits})
    dense = hal.load_model(ggufs["Q8_0"], "cpu", "bfloat16", prefer={"logits": logits},
                           op_overrides={"embedding": embedding_cpu})
    vocab, width = 1024, 128
    codes = vocab * width + vocab * (width // 32) * 4  # int8 codes + float32 scales per 32-block
    assert model.embed.nbytes == model.embed.prepared_bytes == codes
    packed = vocab * width * 2 if logits == "cpu.fbgemm" else 0
    assert model.head.prepared_bytes == packed
    assert (dense.head.prepared_bytes if dense.head is not None else 0) == packed
    assert weight_bytes(model) == weight_bytes(dense) - vocab * width * 2 + codes
    held = _dense_tensors(model.embed) + _dense_tensors(model.head)
    assert held and not any(tuple(t.shape) == (vocab, width) and t.is_floating_point() for t in held)
    section = quantization.describe(model)
    assert section["embedding"] == {"format": "q8_0 int8 g32", "impl": "cpu.torch", "bytes": codes, "tied": True}
    assert section["weight_bytes"]["embedding"] == codes
    assert any("| embedding (tied lm_head) | q8_0 int8 g32 | cpu.torch |" in line
               for line in quantization.markdown(section))


def test_whole_model_against_the_dequantized_float32_judge(ggufs):
    """bfloat16 logits with the Q4_1 table kept quantized: bitwise those of the dense-table model,
    and as close to the float32 judge (every tensor decoded exactly) as dense bfloat16 is."""
    path = ggufs["Q4_1"]
    judge = hal.load_model(path, "cpu", "float32", reference=True)
    assert isinstance(judge.embed, torch.Tensor) and torch.equal(judge.embed, gguf_table(path))
    ref = judge.logits(LONG)
    kept = hal.load_model(path, "cpu", "bfloat16").logits(LONG)
    dense = hal.load_model(path, "cpu", "bfloat16", quantize="dequantize").logits(LONG)
    assert _nmse(ref, kept) <= model_nmse_bound("bfloat16", _nmse(ref, dense)) and _nmse(ref, dense) < 1e-3
    same = hal.load_model(path, "cpu", "bfloat16", op_overrides={"embedding": embedding_cpu}).logits(LONG)
    assert torch.equal(kept, same)


def test_float32_decodes_the_table_at_load(ggufs):
    """float32 keeps its single GEMM over a dense table (bitwise the dequantized file's logits)."""
    kept = hal.load_model(ggufs["Q8_0"], "cpu", "float32")
    assert isinstance(kept.embed, torch.Tensor) and torch.equal(kept.embed, gguf_table(ggufs["Q8_0"]))


def test_floor_copies_keep_a_table_that_rounding_leaves_unchanged(ggufs):
    """validation/floor.py's rounded-weights copy: a bfloat16 table's values (float16 scale x small
    integer, rounded to 8 bits) are all float16 values, so rounding to either dtype keeps the table
    itself, and the copy's logits are the dense-table model's copy's."""
    from validation.floor import weights_rounded

    model = hal.load_model(ggufs["Q8_0"], "cpu", "bfloat16")
    dense = hal.load_model(ggufs["Q8_0"], "cpu", "bfloat16", op_overrides={"embedding": embedding_cpu})
    for dtype in (torch.bfloat16, torch.float16):
        rounded = weights_rounded(model, dtype)
        assert rounded.embed is model.embed and rounded.lm_head is rounded.embed
        assert torch.equal(rounded.logits(IDS), weights_rounded(dense, dtype).logits(IDS))
