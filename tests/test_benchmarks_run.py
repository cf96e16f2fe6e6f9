"""``python -m benchmarks.run --quick`` on tiny: the result document's structure, ratios that equal
the ratio of the measured values in the same document, the tables printed, and the gate run on
two of its documents. No timing is asserted (machines are noisy); the arithmetic is."""
from __future__ import annotations

import json

import pytest

from benchmarks import suite
from benchmarks.compare import main as gate
from benchmarks.run import main as run

ENGINES = ("ours", "transformers-sdpa", "transformers-eager", "llama.cpp")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        code = run(["--device", "cpu", "--preset", "tiny", "--quick", "--no-progress", "--threads", "2",
                    "--json", str(out / "bench.json"), "--markdown", str(out / "bench.md")])
    finally:
        torch.set_num_threads(threads)  # --threads sets the process-wide count; later tests keep theirs
    assert code == 0
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text(), out / "bench.json"


def rows(result, table, engine=None):
    return [r for r in result["rows"] if r["table"] == table and engine in (None, r["engine"])]


def test_environment_is_recorded(quick):
    result, _, _ = quick
    env = result["environment"]
    assert result["schema"] == "minicpm-hal-bench/1"
    assert env["device"] == "cpu" and env["threads"] == 2
    for when in ("load_average_start", "load_average_end"):
        assert len(env[when]) == 3 and all(v >= 0 for v in env[when])
    assert env["versions"]["torch"] and env["versions"]["transformers"] and env["versions"]["python"]
    assert env["command"].startswith("python -m benchmarks.run --device cpu --preset tiny --quick")
    assert result["model"]["name"] == "synthetic tiny" and result["model"]["dtype"] == "float32"
    assert result["plan"]["quick"] is True


def test_every_table_has_every_engine(quick):
    result, _, _ = quick
    plan = result["plan"]
    expected_cases = {
        "throughput": [str(n) for n in plan["max_tokens"]],
        "single": [str(plan["single_tokens"])],
        "long": ["252"],
    }
    for table, cases in expected_cases.items():
        for case in cases:
            engines = {r["engine"]: r for r in rows(result, table) if r["case"] == case}
            assert set(engines) == set(ENGINES), (table, case)
            assert "metrics" in engines["ours"] and "metrics" in engines["transformers-sdpa"]
            assert engines["llama.cpp"]["skipped"]  # tiny is not a GGUF file: a reason, not a number
    assert {r["engine"] for r in rows(result, "memory")} == set(ENGINES)
    ops = rows(result, "ops", "ours")
    assert {r["case"] for r in ops} >= {"prefill attention_prefill", "decode attention_decode", "decode logits",
                                        "prefill linear qkv"}
    assert {r["case"] for r in rows(result, "ops", "torch-sdpa")} == {"prefill attention_prefill",
                                                                       "decode attention_decode"}


def test_metrics_follow_from_the_measured_seconds(quick):
    result, _, _ = quick
    batch = result["plan"]["batch"]
    for r in rows(result, "throughput"):
        if "metrics" not in r:
            continue
        m = r["metrics"]
        assert m["output_tokens"] == batch * int(r["case"])
        assert m["output_tok_s"] == pytest.approx(m["output_tokens"] / m["seconds"], rel=1e-12)
        assert m["input_tok_s"] == pytest.approx(m["input_tokens"] / m["seconds"], rel=1e-12)
    for r in rows(result, "long"):
        if "metrics" in r:
            assert r["metrics"]["prompt_tokens"] == 252 and r["metrics"]["prefill_tok_s"] > 0
    ours = rows(result, "memory", "ours")[0]["metrics"]
    cfg = {"L": 4, "Hk": 2, "D": 32}  # the tiny preset (model/synthetic.py), float32 KV
    assert ours["kv_bytes_per_token"] == 2 * cfg["L"] * cfg["Hk"] * cfg["D"] * 4
    assert ours["kv_capacity_tokens"] == ours["free_bytes"] // ours["kv_bytes_per_token"]


def test_ratios_equal_the_ratio_of_the_measured_values(quick):
    result, _, _ = quick
    measured = {(r["table"], r["case"], r["engine"]): r["metrics"] for r in result["rows"] if "metrics" in r}
    assert result["ratios"]
    for key, entry in result["ratios"].items():
        table, case, metric, engine = key.split("/")
        ours, theirs = measured[(table, case, "ours")][metric], measured[(table, case, engine)][metric]
        expected = ours / theirs if suite.HEADLINE[(table, metric)] else theirs / ours
        assert entry["value"] == pytest.approx(expected, rel=1e-12), key
    keys = set(result["ratios"])
    for engine in ("transformers-sdpa", "transformers-eager"):
        assert f"throughput/16/output_tok_s/{engine}" in keys
        assert f"long/252/decode_ms_per_token/{engine}" in keys
    assert "ops/decode attention_decode/ms/torch-sdpa" in keys
    assert not any(k.endswith("/llama.cpp") for k in keys)  # skipped: no ratio
    assert result["ratios"]["memory/load/load_s/transformers-sdpa"]["tracked"] is False


def test_greedy_tokens_are_compared_for_every_measured_baseline(quick):
    result, _, _ = quick
    pairs = {(g["table"], g["case"], g["baseline"]) for g in result["greedy"]}
    for r in result["rows"]:
        if r["engine"].startswith("transformers") and "metrics" in r and r["table"] in ("throughput", "single", "long"):
            assert (r["table"], r["case"], r["engine"]) in pairs
    for g in result["greedy"]:
        assert g["identical"] == (g["first_divergence"] is None)
    single = next(g for g in result["greedy"] if g["table"] == "single")
    assert single["compared"] == result["plan"]["single_tokens"]


def test_markdown_holds_the_seed_tables(quick):
    _, text, _ = quick
    for title in ("### Throughput (batch 10)", "### Single request (11 input tokens)", "### Long context",
                  "### Memory and start-up", "### Bound ops on the model's shapes (median)",
                  "### Greedy tokens: ours against each baseline", "Load average"):
        assert title in text
    assert "skipped: the model is not a GGUF file" in text


def test_gate_on_two_documents_of_a_run(quick, tmp_path):
    result, _, path = quick
    assert gate([str(path), str(path)]) == 0
    worse = json.loads(json.dumps(result))
    key = "throughput/16/output_tok_s/transformers-sdpa"
    worse["ratios"][key]["value"] *= 0.5
    worse_path = tmp_path / "worse.json"
    worse_path.write_text(json.dumps(worse))
    assert gate([str(path), str(worse_path)]) == 1


def test_first_divergence():
    assert suite.first_divergence([[1, 2, 3]], [[1, 2, 3]]) == {"compared": 3, "identical": True,
                                                                 "first_divergence": None}
    got = suite.first_divergence([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 7]])
    assert got == {"compared": 6, "identical": False,
                   "first_divergence": {"row": 1, "index": 1, "ours": 5, "baseline": 9}}
    # the earliest index over all rows, not the first row that differs
    got = suite.first_divergence([[1, 2, 3], [4, 5, 6]], [[1, 2, 0], [0, 5, 6]])
    assert got["first_divergence"] == {"row": 1, "index": 0, "ours": 4, "baseline": 0}
    got = suite.first_divergence([[1, 2]], [[1]])  # a shorter baseline diverges where it ends
    assert got["first_divergence"] == {"row": 0, "index": 1, "ours": 2, "baseline": None}


def test_bad_input_is_one_line_exit_2(capsys, tmp_path):
    assert run(["--device", "cpu", "--model", str(tmp_path / "absent"), "--quick"]) == 2
    assert run(["--device", "cpu", "--preset", "huge", "--quick"]) == 2
    assert run(["--device", "nosuch", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "absent: model not found" in err[0] and "unknown preset 'huge'" in err[1]


def test_default_model_is_the_trained_gguf_where_fetched_else_tiny(tmp_path, monkeypatch):
    from benchmarks.run import default_model
    from model.trained import trained_gguf_path

    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path))
    path, name = default_model()
    assert name == "synthetic tiny" and (path / "config.json").is_file() and path.parent == tmp_path
    fetched = trained_gguf_path()
    assert fetched.parent.parent == tmp_path
    fetched.parent.mkdir(parents=True)
    fetched.write_bytes(b"GGUF")  # only presence decides the default; loading checks the file
    assert default_model() == (fetched, "SmolLM2-135M-Instruct (trained)")
