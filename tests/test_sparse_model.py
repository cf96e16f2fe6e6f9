"""InfLLM-v2 through the whole model (tiny checkpoints with a scaled-down sparse_config):
config validation, sparse == dense when the budget covers every block, selective sparse
attention differs from dense, the switch at dense_len mid-generation, cache == recompute, and
the torch ops == the float32 reference ops."""
from __future__ import annotations

import pytest
import torch

import hal
from hal.errors import ConfigError
from model.config import parse_config
from model.synthetic import write_checkpoint

# scaled-down geometry (MiniCPM4's ratios): 8/4 kernels, 16-token blocks, 2 local blocks
SMALL = {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16, "window_size": 32,
         "topk": 3, "use_nope": False, "dense_len": 64}
PROMPT = [(37 * i) % 1000 + 3 for i in range(150)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    return {
        "dense": write_checkpoint(root / "dense", "tiny"),
        "sparse": write_checkpoint(root / "sparse", "tiny", overrides={"sparse_config": SMALL}),
        "all-blocks": write_checkpoint(root / "all", "tiny", overrides={"sparse_config": dict(SMALL, topk=1000)}),
    }


def _config(**sparse):
    from model.synthetic import _config as preset

    data = preset("tiny")
    data["sparse_config"] = dict(SMALL, **sparse)
    return parse_config(data)


def test_sparse_config_gives_the_v2_geometry():
    g = _config().sparse.geometry
    assert (g.kernel_size, g.kernel_stride, g.coarse_size, g.coarse_stride) == (8, 4, 32, 16)
    assert (g.block_size, g.init_blocks, g.local_blocks, g.budget) == (16, 1, 2, 5)  # budget = topk + window/block
    assert _config().sparse.applies(64) and not _config().sparse.applies(63)
    assert _config(dense_len=-1).sparse.applies(1)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("use_nope", True, "'sparse_config.use_nope' true is not supported"),
    ("window_size", 40, "'sparse_config.window_size' must be a multiple of block_size=16, got 40"),
    ("block_size", 18, "'sparse_config.block_size' must be a multiple of kernel_stride=4, got 18"),
    ("topk", 1, "'sparse_config.topk' must be > init_blocks=1"),
    ("kernel_size", "32", "'sparse_config.kernel_size' must be an integer"),
])
def test_bad_sparse_config_names_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _config(**{field: value})


def test_sparse_with_every_block_selected_equals_dense(checkpoints):
    dense = hal.load_model(checkpoints["dense"], "cpu", "float32")
    sparse = hal.load_model(checkpoints["all-blocks"], "cpu", "float32")
    ids = torch.tensor([PROMPT])
    torch.testing.assert_close(sparse.logits(ids), dense.logits(ids), rtol=1e-4, atol=1e-4)


def test_selective_sparse_attention_changes_late_positions_only(checkpoints):
    dense = hal.load_model(checkpoints["dense"], "cpu", "float32")
    sparse = hal.load_model(checkpoints["sparse"], "cpu", "float32")
    ids = torch.tensor([PROMPT])
    a, b = dense.logits(ids)[0], sparse.logits(ids)[0]
    # queries in blocks 0..3 see every block (1 init + 2 local + their own): identical
    torch.testing.assert_close(b[:64], a[:64], rtol=1e-4, atol=1e-4)
    assert (b[96:] - a[96:]).abs().max() > 1e-2  # later ones skip blocks


@pytest.mark.parametrize("prompts", [[PROMPT[:50]], [PROMPT[:50], PROMPT[7:40]]], ids=["b1", "b2-padded"])
def test_cached_generation_crossing_dense_len_equals_recompute(checkpoints, prompts):
    model = hal.load_model(checkpoints["sparse"], "cpu", "float32")
    cached = model.generate(prompts, max_new_tokens=24, do_sample=False, eos_token_id=-1)  # crosses 64 at 15
    recomputed = model.generate(prompts, max_new_tokens=24, do_sample=False, eos_token_id=-1, use_cache=False)
    assert cached == recomputed


def test_torch_ops_match_the_reference_ops(checkpoints):
    reference = hal.load_model(checkpoints["sparse"], "cpu", "float32", reference=True)
    fast = hal.load_model(checkpoints["sparse"], "cpu", "float32")
    assert fast.bound_ops["block_sparse_attention"] == "cpu.torch"
    ids = torch.tensor([PROMPT[:120]])
    torch.testing.assert_close(fast.logits(ids), reference.logits(ids), rtol=1e-4, atol=1e-4)



def test_sparse_decode_benchmark_script_runs(capsys):
    from benchmarks import sparse_decode

    assert sparse_decode.main(["--lengths", "1024", "--rounds", "1"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("| 1024 |") and row.endswith("x |")
