"""GGUF files of architecture ``minicpm`` (written from our synthetic ``tiny`` checkpoint the way
llama.cpp's converter writes them, ``tests/llamacpp_convert.py``) load to the same model as the
original safetensors; bad files fail with one line naming the problem."""
from __future__ import annotations

import dataclasses
import shutil

import gguf
import numpy as np
import pytest
import torch

import hal
from hal.errors import CheckpointError
from model.gguf_checkpoint import permute_rows, unpermute_rows
from model.synthetic import write_checkpoint
from llamacpp_convert import converter_permute, write_minicpm_gguf

IDS = torch.tensor([[1, 5, 9, 200, 7, 300, 12, 1016, 44]])
TEXTS = ("The capital of France is", "  two  spaces", " lead", "trail  ", "a\n\n b\tc",
         "<|im_start|>user\nHi 42<|im_end|>\n", "中文 🚀 café", "")


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    """tiny (tied, LongRoPE with max_position_embeddings > original: long factors, mscale != 1)."""
    return write_checkpoint(tmp_path_factory.mktemp("gguf") / "tiny", "tiny", seed=0, dtype="float32")


@pytest.fixture(scope="module")
def tiny_untied_f32(tmp_path_factory):
    """tiny untied, with original == max_position_embeddings (the shipped MiniCPM4 configs), so the
    converter's keys alone describe it."""
    return write_checkpoint(tmp_path_factory.mktemp("gguf") / "untied", "tiny", seed=1, dtype="float32",
                            overrides={"tie_word_embeddings": False, "rope_scaling": {
                                "rope_type": "longrope", "original_max_position_embeddings": 4096,
                                "long_factor": [1.0 + i / 8 for i in range(16)],
                                "short_factor": [1.0 + i / 16 for i in range(16)]}})


def _config_equal(a, b):
    """Fields equal; rope factors equal after the float32 storage GGUF gives them."""
    for field in dataclasses.fields(a):
        if field.name in ("raw", "eos_token_ids"):
            continue
        x, y = getattr(a, field.name), getattr(b, field.name)
        if field.name == "rope_scaling" and x is not None:
            assert x.original_max_position_embeddings == y.original_max_position_embeddings
            for name in ("long_factor", "short_factor"):
                assert np.array_equal(np.float32(getattr(x, name)), np.float32(getattr(y, name)))
            continue
        assert x == y, field.name


def test_converter_permutation_is_undone():
    w = torch.randn(6 * 8, 5)
    for heads in (6, 2):  # q (n_head) and k (n_kv_head) of a GQA model
        permuted = converter_permute(w, heads if heads == 6 else 6, heads if heads != 6 else 6)
        assert torch.equal(permute_rows(w, heads), permuted)
        assert torch.equal(unpermute_rows(permuted, heads), w)
        assert not torch.equal(permuted, w)


@pytest.mark.parametrize("which", ["tied-longrope-original-key", "untied-converter-keys-only"])
def test_minicpm_gguf_logits_equal_safetensors(which, tiny_f32, tiny_untied_f32, tmp_path):
    folder = tiny_f32 if which.startswith("tied") else tiny_untied_f32
    path = write_minicpm_gguf(folder, tmp_path / "m.gguf", write_original_context=which.startswith("tied"))
    reader = gguf.GGUFReader(path)
    assert ("output.weight" in {t.name for t in reader.tensors}) == which.startswith("untied")
    original = hal.load_model(folder, "cpu", "float32")
    loaded = hal.load_model(path, "cpu", "float32")
    _config_equal(original.config, loaded.config)
    assert torch.equal(loaded.logits(IDS), original.logits(IDS))
    original_bf16 = hal.load_model(folder, "cpu", "bfloat16")
    assert torch.equal(hal.load_model(path, "cpu", "bfloat16").logits(IDS), original_bf16.logits(IDS))


def test_minicpm_gguf_without_original_context_follows_llama_cpp(tiny_f32, tmp_path):
    """The converter writes no original_context_length; llama.cpp then takes context_length as the
    original (short factors, no mscale), and so do we."""
    path = write_minicpm_gguf(tiny_f32, tmp_path / "m.gguf")
    scaling = hal.api.checkpoint_config(path).rope_scaling
    assert scaling.original_max_position_embeddings == 4096


def test_minicpm_gguf_tokenizer_equals_transformers_gguf_tokenizer(tiny_f32, tmp_path):
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    from model.gguf_file import GGUFFile
    from model.gguf_tokenizer import load_gguf_tokenizer

    path = write_minicpm_gguf(tiny_f32, tmp_path / "m.gguf")
    # transformers refuses architecture minicpm for models; its GGUF tokenizer builder does not care
    architecture, described, settings = get_gguf_tokenizer(str(path))
    backend, _ = convert_gguf_tokenizer(architecture, described)
    expected = PreTrainedTokenizerFast(tokenizer_object=backend, **settings)
    ours = load_gguf_tokenizer(GGUFFile(path))
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == expected(text)["input_ids"], repr(text)
        assert ours.decode(ids) == expected.decode(ids), repr(text)
    assert ours.chat_template == expected.chat_template is not None


def test_convert_round_trip_of_a_minicpm_gguf(tiny_f32, tmp_path):
    from model.convert import convert

    path = write_minicpm_gguf(tiny_f32, tmp_path / "m.gguf", write_original_context=True)
    out = convert(path, tmp_path / "hf")
    converted = hal.load_model(out, "cpu", "float32")
    assert torch.equal(converted.logits(IDS), hal.load_model(path, "cpu", "float32").logits(IDS))


# -- bad files: one line naming the problem ---------------------------------------------------

def _one_line(exc_info, *needles):
    message = str(exc_info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_unknown_architecture(tmp_path):
    path = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError) as info:
        hal.load_model(path, "cpu", "float32")
    _one_line(info, str(path), "unsupported GGUF architecture 'qwen2'")


def test_missing_key(tiny_f32, tmp_path):
    path = write_minicpm_gguf(tiny_f32, tmp_path / "m.gguf", skip_keys=("minicpm.embedding_scale",))
    with pytest.raises(CheckpointError) as info:
        hal.load_model(path, "cpu", "float32")
    _one_line(info, "missing GGUF metadata key 'minicpm.embedding_scale'")


def test_unsupported_tensor_type(tiny_f32, tmp_path):
    path = write_minicpm_gguf(tiny_f32, tmp_path / "m.gguf",
                              tensor_type=lambda name: (gguf.GGMLQuantizationType.Q8_1
                                                        if name == "blk.1.ffn_up.weight"
                                                        else gguf.GGMLQuantizationType.F32))
    with pytest.raises(CheckpointError) as info:
        hal.load_model(path, "cpu", "float32")
    _one_line(info, "blk.1.ffn_up.weight", "unsupported GGUF tensor type Q8_1")


def test_truncated_file(tiny_f32, tmp_path):
    path = write_minicpm_gguf(tiny_f32, tmp_path / "m.gguf")
    data = path.read_bytes()
    for keep in (len(data) - 1000, 2000, 10):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(CheckpointError) as info:
            hal.load_model(cut, "cpu", "float32")
        _one_line(info, str(cut))


def test_quantized_minicpm_gguf_equals_safetensors_of_the_dequantized_weights(tiny_f32, tmp_path):
    """Q8_0 storage: the model equals the safetensors checkpoint whose linears are gguf-py's
    quantize -> dequantize round trip of the original weights (Q8_0 blocks run along a row, so the
    converter's row permutation does not change them)."""
    from safetensors.torch import load_file, save_file

    def q8(name):
        quantized = name.startswith("blk.") and not name.endswith("norm.weight")
        return gguf.GGMLQuantizationType.Q8_0 if quantized else gguf.GGMLQuantizationType.F32

    path = write_minicpm_gguf(tiny_f32, tmp_path / "q8.gguf", write_original_context=True, tensor_type=q8)
    reference = shutil.copytree(tiny_f32, tmp_path / "dequantized")
    tensors = load_file(reference / "model.safetensors")
    for name, tensor in tensors.items():
        if name.startswith("model.layers.") and "layernorm" not in name:
            blocks = gguf.quants.quantize(tensor.numpy(), gguf.GGMLQuantizationType.Q8_0)
            tensors[name] = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).copy())
    save_file(tensors, reference / "model.safetensors")
    expected = hal.load_model(reference, "cpu", "float32").logits(IDS)
    assert torch.equal(hal.load_model(path, "cpu", "float32").logits(IDS), expected)
    assert not torch.equal(hal.load_model(tiny_f32, "cpu", "float32").logits(IDS), expected)


def test_cli_convert_bad_file_exits_2_with_one_line_and_no_folder(tmp_path, capsys):
    from model.convert import main

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    assert main([str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(bad) in err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


def test_convert_interrupted_leaves_nothing(tiny_f32, tmp_path, monkeypatch):
    import safetensors.torch

    from model.convert import main

    path = write_minicpm_gguf(tiny_f32, tmp_path / "m.gguf")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    assert main([str(path), str(tmp_path / "out")]) == 130  # SIGINT's code (hal/cli.py)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_compare_cli_accepts_gguf_and_reports_bad_one(tmp_path, capsys):
    from validation.compare import main

    shutil.copyfile(__file__, tmp_path / "not.gguf")
    assert main(["--model", str(tmp_path / "not.gguf"), "--device", "cpu",
                 "--report-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "not.gguf" in err[-1] and "Traceback" not in "\n".join(err)
