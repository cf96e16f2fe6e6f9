"""Decode graphs (model/decode_graph.py) on the emulated NPU: the replayed steps give the
reference's logits and the eager path's tokens, the graph is captured once and binds only
capturable implementations. Hardware runs: tests/test_decode_graph.py."""
from __future__ import annotations

import pytest
import torch

import hal
from backends.npu.emulator import graphs as emulated_graphs
from model.decode_graph import DecodeGraph
from npu_metrics import nmse

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3], [900, 2, 33]]  # batch 2, the second left-padded


@pytest.fixture
def captures(monkeypatch) -> list:
    """One entry per emulated NPUGraph capture started during the test."""
    seen: list = []
    begin = emulated_graphs.NPUGraph.capture_begin
    monkeypatch.setattr(emulated_graphs.NPUGraph, "capture_begin",
                        lambda self, *a, **k: (seen.append(1), begin(self, *a, **k))[1])
    return seen


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in PROMPTS])
    return ids, torch.tensor([longest - len(p) for p in PROMPTS])


@pytest.mark.parametrize(("which", "attention"), [("d64", "npu.torch_npu_bsnd"), ("d128", "npu.torch_npu")])
def test_replayed_decode_steps_match_the_reference(emulated, request, which, attention):
    """Prefill eagerly, then 6 steps replayed from the graph (FIA inside it, BSND for head_dim 64,
    TND for 128); each step's logits against the float32 reference run without a cache over each
    row's real tokens so far."""
    path = request.getfixturevalue(f"{which}_checkpoint")
    reference = hal.load_model(path, "cpu", "float32", reference=True)
    npu = hal.load_model(path, "npu")
    ids, starts = _padded()
    cache = npu.new_cache(2, ids.shape[1] + 8)
    logits = npu.forward(ids, cache=cache, kv_start=starts, logits_last_only=True).logits[:, -1]
    graph = DecodeGraph(npu, cache, starts)
    assert graph.bound_ops["attention_decode"] == attention
    rows = [list(p) for p in PROMPTS]
    for step in range(6):
        tokens = logits.float().argmax(-1)
        for row, token in zip(rows, tokens.tolist()):
            row.append(token)
        logits = graph.step(tokens).clone()
        for b, row in enumerate(rows):
            ref = reference.logits(torch.tensor([row]))[0, -1]
            err = nmse(ref, logits[b].float())
            assert err < 1e-3, f"step {step} row {b}: NMSE {err:.2e}"
    assert graph.captured and cache.length == ids.shape[1] + 6
    assert cache.lengths.tolist() == [len(r) for r in rows]  # every fed token is in the cache


def test_generate_with_the_graph_equals_eager_and_captures_once(emulated, d64_checkpoint, captures):
    npu = hal.load_model(d64_checkpoint, "npu")
    for sampling in ({"do_sample": False}, {"do_sample": True, "seed": 7, "temperature": 0.9, "top_k": 40}):
        eager = npu.generate(PROMPTS, max_new_tokens=8, **sampling)
        graphed = npu.generate(PROMPTS, max_new_tokens=8, decode_graph=True, **sampling)
        assert graphed == eager, sampling
    assert captures == [1, 1]  # one capture per generate call, every later step a replay


def test_the_graph_captures_fia_and_refreshes_its_lengths(emulated, d64_checkpoint, monkeypatch):
    """Decode attention stays FIA inside the graph (captured with auto_dispatch_capture, one FIA
    record per layer), and every replay is preceded by an update with that step's kv lengths."""
    npu = hal.load_model(d64_checkpoint, "npu")
    assert npu.bound_ops["attention_decode"] == "npu.torch_npu_bsnd"  # eager decode: FIA, head_dim 64
    ids, starts = _padded()
    cache = npu.new_cache(2, ids.shape[1] + 4)
    logits = npu.forward(ids, cache=cache, kv_start=starts, logits_last_only=True).logits[:, -1]
    graph = DecodeGraph(npu, cache, starts)
    assert graph.bound_ops["attention_decode"] == "npu.torch_npu_bsnd"
    assert graph.bound_ops["kv_write"] == "npu.torch" and graph.bound_ops["rms_norm"] == "npu.torch_npu"
    assert "auto_dispatch_capture=True" in graph.mode and "npu.torch_npu_bsnd" in graph.mode
    updates = []
    real_update = emulated_graphs.NPUGraph.update
    monkeypatch.setattr(emulated_graphs.NPUGraph, "update",
                        lambda self, cpu_update_input: (updates.append(cpu_update_input),
                                                        real_update(self, cpu_update_input))[1])
    for _ in range(3):
        logits = graph.step(logits.float().argmax(-1)).clone()
    real = [len(p) for p in PROMPTS]
    assert updates == [[{"actual_seq_lengths_kv": [n + step for n in real]}] for step in (1, 2, 3)]
    (captured, _), = graph._graphs.values()
    assert captured.update_records == npu.config.num_hidden_layers
    assert graph.runtime.emulated and "EMULATED" in graph.runtime.name


def test_torch_full_serves_the_graph_where_fia_cannot(emulated, d64_checkpoint, tiny_checkpoint):
    """float32 (FIA takes bf16/fp16) and a graph runtime without updates fall back to torch_full."""
    from hal.registry import bind
    from model.decode_graph import GRAPH_OPS

    fp32 = hal.load_model(d64_checkpoint, "npu", "float32")
    graph = DecodeGraph(fp32, fp32.new_cache(1, 16))
    assert graph.bound_ops["attention_decode"] == "npu.torch_full"
    shapes = hal.load_model(d64_checkpoint, "npu").ops.context.shapes
    plain = bind("npu", torch.bfloat16, shapes, capture=GRAPH_OPS)  # no graph_updates
    record = plain.record["attention_decode"]
    assert record.impl == "npu.torch_full"
    assert "NPUGraph.update" in dict(record.passed_over)["npu.torch_npu_bsnd"]
    assert "not capturable" in dict(record.passed_over)["npu.torch"]


def test_step_past_the_cache_capacity_is_refused(emulated, d64_checkpoint):
    npu = hal.load_model(d64_checkpoint, "npu")
    cache = npu.new_cache(1, 128)
    npu.forward(torch.arange(1, 128).view(1, -1), cache=cache)
    graph = DecodeGraph(npu, cache)
    graph.step(torch.tensor([5]))
    with pytest.raises(ValueError, match="exceeds capacity 128"):
        graph.step(torch.tensor([6]))
    assert cache.length == 128


def test_decode_graph_benchmark_script(emulated, capsys):
    from benchmarks import decode_graph

    assert decode_graph.main(["--device", "npu", "--preset", "tiny", "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "graph_tokens_equal_to_eager: 4/4" in out and "graph_over_eager: " in out


def test_a_sparse_model_gets_a_second_graph_past_dense_len(emulated, tmp_path, captures):
    from model.synthetic import write_checkpoint

    sparse = {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16, "window_size": 32,
              "topk": 3, "use_nope": False, "dense_len": 64}
    path = write_checkpoint(tmp_path / "sparse", "tiny", overrides={"sparse_config": sparse})
    npu = hal.load_model(path, "npu")
    prompt = [[(37 * i) % 1000 + 3 for i in range(50)]]
    eager = npu.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=-1)
    graphed = npu.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=-1, decode_graph=True)
    assert graphed == eager
    assert len(captures) == 2  # dense steps, then sparse ones from length 64


def test_a_replay_without_the_length_update_reads_the_captured_lengths(emulated, d64_checkpoint, monkeypatch):
    """The update is what makes FIA in the graph right: with GraphRuntime.refresh switched off,
    every replay attends over the lengths of the captured step, and the logits leave the eager
    path's from the second replayed step on."""
    from hal.graphs import GraphRuntime

    npu = hal.load_model(d64_checkpoint, "npu")
    ids, starts = _padded()

    def run(refresh: bool) -> list[torch.Tensor]:
        cache = npu.new_cache(2, ids.shape[1] + 4)
        npu.forward(ids, cache=cache, kv_start=starts, logits_last_only=True)
        graph = DecodeGraph(npu, cache, starts)
        if not refresh:
            monkeypatch.setattr(GraphRuntime, "refresh", lambda self, graph, kv_lens: None)
        return [graph.step(torch.tensor([7 + i, 40 + i])).clone() for i in range(3)]

    updated, stale = run(True), run(False)
    assert torch.equal(updated[0], stale[0])  # the captured step itself
    assert nmse(updated[2].float(), stale[2].float()) > 1e-3  # later steps: the new keys were not read
