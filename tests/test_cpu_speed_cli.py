"""``python -m benchmarks.cpu_speed`` (issue 13's table) in its quick mode on a small GGUF, without
llama.cpp (kept out of CI), and the F32 file it builds for llama.cpp: the ``gguf`` package's
dequantization of every tensor, the metadata copied, loading to the same logits."""
from __future__ import annotations

import re

import gguf
import pytest
import torch

import hal
from benchmarks import cpu_speed
from benchmarks.cpu_vs_llama import int4_unavailable
from benchmarks.gguf_variants import f32_gguf, tensor_types
from llamacpp_convert import write_minicpm_gguf
from model.synthetic import write_checkpoint


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory):
    """The tiny checkpoint as a GGUF with its 2-D weights in Q8_0 (the norms stay F32)."""
    root = tmp_path_factory.mktemp("cpu_speed")
    folder = write_checkpoint(root / "tiny", "tiny", dtype="float32")

    def q8(name: str):
        matrix = name.endswith("weight") and "norm" not in name
        return gguf.GGMLQuantizationType.Q8_0 if matrix else gguf.GGMLQuantizationType.F32

    return write_minicpm_gguf(folder, root / "tiny.Q8_0.gguf", tensor_type=q8)


def test_f32_gguf_holds_the_gguf_packages_dequantization(q8_gguf):
    path = f32_gguf(q8_gguf)
    assert f32_gguf(q8_gguf) == path  # cached
    source, built = gguf.GGUFReader(q8_gguf), gguf.GGUFReader(path)
    assert set(tensor_types(q8_gguf)) == {"Q8_0", "F32"} and set(tensor_types(path)) == {"F32"}
    made = {t.name: t for t in built.tensors}
    for tensor in source.tensors:
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert made[tensor.name].data.tolist() == expected.tolist(), tensor.name
    copied = [k for k in source.fields if not k.startswith("GGUF.") and k != "general.file_type"]
    for key in copied:
        assert built.fields[key].contents() == source.fields[key].contents(), key
    assert built.fields["general.file_type"].contents() == 0  # ALL_F32
    ids = torch.tensor([[5, 9, 200, 31, 7]])
    assert torch.equal(hal.load_model(path, "cpu", "float32").logits(ids),
                       hal.load_model(q8_gguf, "cpu", "float32").logits(ids))


def test_quick_run_prints_the_table_without_llama_cpp(q8_gguf, capsys):
    code = cpu_speed.main(["--model", str(q8_gguf), "--quick", "--no-llama-cpp", "--threads", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "prompt 16 tokens, 8 greedy tokens, 1 timed rounds" in out
    number = r"\d+\.\d"
    for fmt, engine in (("float32", "ours"), ("float32", r"ours, eager forward \(before\)"), ("bfloat16", "ours")):
        assert re.search(rf"\| {fmt} \| {engine} \| \S+\.F32\.gguf \| {number} \| {number} \({number}\) \|", out), out
    assert re.search(r"\| float32 \| llama\.cpp \| \S+ \| not run \(--no-llama-cpp\) \|", out), out
    int4 = int4_unavailable() or "not run: the Q4_0 file is quantized by llama.cpp"
    assert f"| int4 | ours | Q4_0 | {int4}" in out
    for fmt in ("float32", "bfloat16"):  # measured in fresh processes
        assert re.search(rf"\| {fmt} \| ours \| {number} MiB \| -?{number} MiB \| -?{number} MiB \|", out), out


def test_bad_model_path_is_one_line_exit_2(tmp_path, capsys):
    from hal.cli import run_main

    missing = tmp_path / "none.gguf"
    assert run_main(cpu_speed.main, ["--model", str(missing), "--quick"], "benchmarks.cpu_speed") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a .gguf file" in err[0]
