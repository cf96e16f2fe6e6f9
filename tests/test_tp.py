"""Tensor parallel on the CPU with gloo: TP = 2 and 4 against one process (logits, cached decode,
greedy tokens) on tiny, tiny-sala, a sparse InfLLM-v2 checkpoint and a quantized GGUF; per-rank
weight bytes; the CLIs under torchrun; bad input (one line on rank 0, the same exit code on every
rank, nothing hangs: every launch has a timeout).

Ranks are started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), by :func:`launch` or by torchrun itself (``python -m torch.distributed.run``).

Tolerance. The issue asks for "logits equal TP = 1 within 1e-5 in float32". Measured on these
checkpoints (logits up to |18|), TP = 2 differs from TP = 1 by up to 2.6e-5 absolute: the
row-parallel linears sum their K dimension in two halves, a different float32 order. That is
the float32 floor of any reordering: our two trusted single-process float32 implementations (the
torch ops and the naive reference ops) differ from each other by up to 3.0e-5 on the same inputs
(printed by ``test_tp_matches_one_process``). So the 1e-5 is applied relative to the logits'
scale (max |Δ| <= 1e-5 · max |logits|) and absolute on the next-token probabilities.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hal
from model.sharding import plan
from model.synthetic import write_checkpoint
from model.tp import weight_bytes

sys.path.insert(0, str(Path(__file__).parent))
import tp_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 150
SMALL_SPARSE = {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16, "window_size": 32,
                "topk": 3, "use_nope": False, "dense_len": 64}
UNEVEN_VOCAB = {"vocab_size": 1001, "eos_token_id": [2, 993]}
"""Divisible by neither 2 nor 4: the last vocabulary shard is shorter."""
NAMES = ("tiny", "tiny-sala", "sparse", "uneven-vocab", "gguf-q8")
TP4 = NAMES[:4]
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(size: int, argv_of_rank, timeout: float = LAUNCH_TIMEOUT) -> list[subprocess.CompletedProcess]:
    """Start ``size`` ranks (``argv_of_rank(rank)`` each, after ``python``) with torchrun's
    variables; wait for all (killing every one after ``timeout`` s: a hang fails the test)."""
    port = _free_port()
    procs = []
    for rank in range(size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HAL_TP_TIMEOUT": "60",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, *argv_of_rank(rank)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.communicate()
        pytest.fail(f"{size} ranks did not finish within {timeout} s (a hang)")
    return results


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    import gguf
    from llamacpp_convert import write_minicpm_gguf

    root = tmp_path_factory.mktemp("tp")
    tiny = write_checkpoint(root / "tiny", "tiny", dtype="float32")  # stored float32: zero-copy slices
    q8 = gguf.GGMLQuantizationType.Q8_0
    return {
        "tiny": tiny,
        "tiny-sala": write_checkpoint(root / "sala", "tiny-sala"),  # bfloat16: converted slices
        "sparse": write_checkpoint(root / "sparse", "tiny", overrides={"sparse_config": SMALL_SPARSE}),
        "uneven-vocab": write_checkpoint(root / "uneven", "tiny", overrides=UNEVEN_VOCAB),
        "gguf-q8": write_minicpm_gguf(tiny, root / "q8.gguf",
                                      tensor_type=lambda name: gguf.GGMLQuantizationType.F32 if "norm" in name
                                      else q8),
    }


def _run_ranks(size: int, paths: list[Path], out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    done = launch(size, lambda rank: ["tests/tp_worker.py", str(out), *map(str, paths)])
    for rank, proc in enumerate(done):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}: {proc.stderr[-2000:]}"
    return load_file(out)


@pytest.fixture(scope="module")
def tp2(checkpoints, tmp_path_factory):
    return _run_ranks(2, [checkpoints[n] for n in NAMES], tmp_path_factory.mktemp("tp2") / "out.safetensors")


@pytest.fixture(scope="module")
def tp4(checkpoints, tmp_path_factory):
    return _run_ranks(4, [checkpoints[n] for n in TP4], tmp_path_factory.mktemp("tp4") / "out.safetensors")


@pytest.fixture(scope="module")
def single(checkpoints) -> dict[str, dict[str, torch.Tensor]]:
    """The one-process results (TP = 1), and the total weight bytes."""
    torch.manual_seed(0)
    results = {}
    for name in NAMES:
        model = hal.load_model(checkpoints[name], "cpu", "float32")
        results[name] = {**tp_worker.run(model, model.config.vocab_size), "bytes": weight_bytes(model)}
    return results


def _check(name: str, size: int, got: dict[str, torch.Tensor], index: int, want: dict[str, torch.Tensor]):
    for key in ("logits", "cached"):
        a, b = got[f"{index}.{key}"], want[key]
        delta = float((a - b).abs().max())
        scale = float(b.abs().max())
        prob = float((a.softmax(-1) - b.softmax(-1)).abs().max())
        print(f"TP={size} {name} {key}: max|Δlogit| {delta:.2e} (max|logit| {scale:.1f}), max|Δp| {prob:.2e}")
        assert delta <= TOLERANCE * scale, f"TP={size} {name} {key}: max|Δ| {delta:.2e} > 1e-5 x {scale:.1f}"
        assert prob <= TOLERANCE, f"TP={size} {name} {key}: max|Δp| {prob:.2e} > 1e-5"
    assert torch.equal(got[f"{index}.greedy"], want["greedy"]), f"TP={size} {name}: greedy tokens differ"
    sampled = got[f"{index}.rank_sampled"]  # [ranks, new tokens]: drawn without a seed on every rank
    assert all(torch.equal(row, sampled[0]) for row in sampled), f"TP={size} {name}: ranks sampled {sampled.tolist()}"


@pytest.mark.parametrize("name", NAMES)
def test_tp2_matches_one_process(name, tp2, single, checkpoints):
    _check(name, 2, tp2, NAMES.index(name), single[name])
    if name == "tiny":  # the float32 floor the tolerance note cites: torch ops vs the reference ops
        ids = tp_worker.inputs(1024)["ids"]
        reference = hal.load_model(checkpoints[name], "cpu", "float32", reference=True).logits(ids)
        print(f"float32 floor (torch ops vs reference ops, one process): "
              f"{float((reference - single[name]['logits']).abs().max()):.2e}")


@pytest.mark.parametrize("name", TP4)
def test_tp4_matches_one_process(name, tp4, single):
    """H = 4 over 4 ranks: one query head each, the 2 KV heads replicated (InfLLM-v2 selection
    then gathers its group's queries from the other rank)."""
    _check(name, 4, tp4, NAMES.index(name), single[name])


@pytest.mark.parametrize("size", (2, 4))
def test_rank_weight_bytes_are_a_tp_th_of_the_total(size, tp2, tp4, single, checkpoints):
    """Measured tensor bytes per rank. Bound, counted here from the config: the total / N, plus
    what stays whole on every rank (norms; with N > Hk each rank's replicated KV head's k/v rows
    beyond an N-th; an uneven last vocabulary shard is never larger than the others)."""
    got = tp2 if size == 2 else tp4
    for index, name in enumerate(TP4):
        total = single[name]["bytes"]
        ranks = got[f"{index}.rank_bytes"].tolist()
        config = hal.api.checkpoint_config(checkpoints[name])
        e, d, f32 = config.hidden_size, config.head_dim, 4
        norms = (2 * config.num_hidden_layers + 1) * e * f32  # layer norms and the final norm
        extra = 0  # SALA's q/k norms and o_norm (whole on every rank); replicated KV heads
        for i in range(config.num_hidden_layers):
            if config.mixer(i) == "lightning":
                extra += (2 * d + config.num_attention_heads * d) * f32
            elif size > config.num_key_value_heads:
                kv = 2 * config.num_key_value_heads * d * e * f32
                extra += kv / config.num_key_value_heads - kv / size
        print(f"TP={size} {name}: rank weight bytes {ranks} of {total} one-process "
              f"({[round(r / total, 3) for r in ranks]} of it)")
        for rank_bytes in ranks:
            assert rank_bytes <= total / size + norms + extra, (name, size, ranks, total)
        assert sum(ranks) >= total


def test_shard_slices_cover_every_tensor_once(checkpoints):
    """Each sharded tensor's slices over the ranks tile it exactly (checked against the full
    tensors), and with KV heads replicated each rank keeps the KV head its queries read."""
    from model.checkpoint import expected_shapes

    config = hal.api.checkpoint_config(checkpoints["tiny-sala"])
    for size in (2, 4):
        plans = [plan(config, size, r) for r in range(size)]
        for name, shape in expected_shapes(config).items():
            parts = [p.part(name) for p in plans]
            if parts[0] is None:
                continue
            dim = parts[0][0]
            full = torch.arange(torch.Size(shape).numel()).reshape(shape)
            pieces = [full.narrow(*p) for p in parts]
            if "k_proj" in name or "v_proj" in name:
                layer = int(name.split(".")[2])
                if config.mixer(layer) != "lightning" and size > config.num_key_value_heads:
                    group = config.num_attention_heads // config.num_key_value_heads
                    for p, piece in zip(plans, pieces):
                        kv_head = p.head_start // group  # the KV head of its first query head
                        assert torch.equal(piece, full[kv_head * config.head_dim:(kv_head + 1) * config.head_dim])
                    continue
            assert torch.equal(torch.cat(pieces, dim=dim), full), (name, size)


@pytest.mark.parametrize("config_fields, size, message", [
    ({}, 3, "tp=3 does not divide num_attention_heads=4"),
    ({"num_attention_heads": 12, "num_key_value_heads": 4, "hidden_size": 384}, 6,
     "tp=6 does not divide num_key_value_heads=4 of"),
    ({"intermediate_size": 250}, 4, "tp=4 does not divide intermediate_size=250"),
    ({"vocab_size": 5, "eos_token_id": 2, "bos_token_id": 1}, 4, "tp=4 leaves a rank no rows of vocab_size=5"),
])
def test_bad_tp_sizes_name_the_field(config_fields, size, message):
    from hal.errors import InputError
    from model.config import parse_config
    from model.synthetic import _config

    data = {**_config("tiny"), **config_fields}
    with pytest.raises(InputError, match=message):
        plan(parse_config(data), size, 0)


def test_uneven_vocabulary_is_split_not_refused():
    from model.config import parse_config
    from model.synthetic import _config

    config = parse_config({**_config("tiny"), **UNEVEN_VOCAB})
    shards = [plan(config, 4, r) for r in range(4)]
    assert [(p.vocab_start, p.vocab_stop) for p in shards] == [(0, 251), (251, 502), (502, 753), (753, 1001)]


def test_gptq_with_tp_is_refused():
    from hal.errors import InputError
    from model.config import parse_config
    from model.synthetic import GPTQ_CONFIG, _config

    config = parse_config({**_config("tiny"), "quantization_config": dict(GPTQ_CONFIG)})
    with pytest.raises(InputError, match="tensor parallel of GPTQ-quantized weights is not supported"):
        plan(config, 2, 0)


def test_gguf_part_reads_equal_slices_of_the_whole_tensor(checkpoints):
    from model.gguf_file import GGUFFile

    file = GGUFFile(checkpoints["gguf-q8"])
    name = "blk.0.attn_output.weight"  # Q8_0 [E, H*D]: column parts cut quantization blocks' rows
    whole = file.tensor(name, torch.float32)
    for part in ((0, 32, 64), (1, 64, 64), (1, 0, 32)):
        assert torch.equal(file.tensor(name, torch.float32, part), whole.narrow(*part)), part


def test_generate_under_torchrun_prints_the_one_process_text(checkpoints, capsys):
    from model.generate import main

    args = ["--model", str(checkpoints["tiny"]), "--greedy", "--max-new-tokens", "8", "hello world"]
    assert main(args) == 0
    expected = capsys.readouterr().out
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HAL_TP_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "model.generate", "--tp", "2", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == expected  # rank 1 prints nothing; rank 0 the same text as one process


def test_compare_tp2_writes_one_report_and_agrees_on_the_exit_code(checkpoints, tmp_path):
    import json

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n", encoding="utf-8")
    report = tmp_path / "report"
    done = launch(2, lambda rank: ["-m", "validation.compare", "--tp", "2", "--device", "cpu", "--model",
                                   str(checkpoints["tiny"]), "--prompts", str(prompts), "--positions", "1",
                                   "--report-dir", str(report)])
    assert [p.returncode for p in done] == [0, 0], done[0].stderr[-2000:]
    assert "Report:" in done[0].stdout and done[1].stdout == "" and done[1].stderr == ""
    data = json.loads((report / "report.json").read_text())
    assert data["settings"]["tensor_parallel"]["ranks"] == 2
    from safetensors import safe_open

    with safe_open(str(checkpoints["tiny"] / "model.safetensors"), framework="pt") as f:
        stored = sum(torch.Size(f.get_slice(name).get_shape()).numel() for name in f.keys())
    assert data["model"]["parameters"] == stored  # the whole model's, not rank 0's slice
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt", "report"]


def _generate_argv(model: Path, tp: int):
    return ["-m", "model.generate", "--tp", str(tp), "--model", str(model), "--greedy", "--max-new-tokens", "2", "x"]


def _one_line_on_rank_zero(done: list[subprocess.CompletedProcess], code: int, message: str) -> None:
    assert [p.returncode for p in done] == [code] * len(done), [p.stderr[-500:] for p in done]
    lines = [line for line in done[0].stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and message in lines[0], done[0].stderr
    assert "Traceback" not in done[0].stderr
    for proc in done[1:]:
        assert "error" not in proc.stderr and proc.stdout == "", proc.stderr


def test_tp_that_does_not_divide_the_heads_fails_every_rank(checkpoints):
    done = launch(3, lambda rank: _generate_argv(checkpoints["tiny"], 3))
    _one_line_on_rank_zero(done, 2, "tp=3 does not divide num_attention_heads=4")


def test_tp_other_than_the_world_size_is_refused_on_every_rank(checkpoints):
    done = launch(2, lambda rank: _generate_argv(checkpoints["tiny"], 4))
    _one_line_on_rank_zero(done, 2, "tp=4 needs 4 processes, but this job has 2 (WORLD_SIZE=2)")


def test_a_rank_that_fails_to_load_fails_every_rank(checkpoints, tmp_path):
    """Rank 1's checkpoint folder is missing (a node without the files): rank 0 loaded its
    slice, learns of rank 1's failure at the agreement after loading, and prints rank 1's line."""
    missing = tmp_path / "absent"
    done = launch(2, lambda rank: _generate_argv(checkpoints["tiny"] if rank == 0 else missing, 2))
    _one_line_on_rank_zero(done, 2, f"rank 1: {missing}: checkpoint folder not found")


def test_tp_without_a_launcher_is_one_line(checkpoints, capsys):
    from model.generate import main

    assert main(_generate_argv(checkpoints["tiny"], 2)[2:]) == 2
    assert "tp=2 needs 2 processes, but this job has 1" in capsys.readouterr().err


def test_decode_graph_with_tp_is_refused_where_collectives_are_not_captured(checkpoints, monkeypatch):
    """The emulated NPU: an NPUGraph cannot capture HCCL collectives here; the refusal says so
    (checked before any collective runs, so a TPGroup without a process group serves)."""
    from hal.distributed import TPGroup
    from hal.errors import UnsupportedOpError
    from model.decode_graph import DecodeGraph
    from model.tp import TensorParallel

    from backends.npu import emulator
    from hal.probing import reset

    monkeypatch.setenv("HAL_NPU_EMULATE", "1")
    reset()
    try:
        model = hal.load_model(checkpoints["tiny"], "npu", "float32")
        model.tp = TensorParallel(plan(model.config, 2, 0), TPGroup(0, 2, torch.device("cpu"), "gloo"))
        with pytest.raises(UnsupportedOpError, match="only CUDA graphs capture the collectives"):
            DecodeGraph(model, model.new_cache(1, 8))
    finally:
        emulator.uninstall()
        reset()


def test_bad_tp_timeout_names_the_variable(monkeypatch):
    from hal import env
    from hal.errors import InputError

    monkeypatch.setenv("HAL_TP_TIMEOUT", "-3")
    with pytest.raises(InputError, match="HAL_TP_TIMEOUT must be a number of seconds > 0, got '-3'"):
        env.tp_timeout()


def test_kept_quantized_weights_with_tp_are_refused(checkpoints):
    """Tensor parallel slices dense weights: quantize='keep' is refused before any process group
    forms (a quantized GGUF under TP with quantize=None is dequantized: the gguf-q8 runs above)."""
    from hal.errors import InputError

    with pytest.raises(InputError, match="tp=2: tensor parallel of quantized weights is not supported"):
        hal.load_model(checkpoints["gguf-q8"], "cpu", "float32", quantize="keep", tp=2)
