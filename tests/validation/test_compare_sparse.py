"""validation.compare on an InfLLM-v2 checkpoint with a prompt past dense_len: the sparse path
is what gets compared, and its ops are checked on the model's shapes and geometry."""
from __future__ import annotations

from compare_runner import run_cli

from model.synthetic import write_checkpoint

SPARSE = {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16, "window_size": 32,
          "topk": 3, "use_nope": False, "dense_len": 64}


def test_compare_on_a_long_prompt_checks_the_sparse_ops(tmp_path):
    path = write_checkpoint(tmp_path / "sparse", "tiny", overrides={"sparse_config": SPARSE})
    prompts = tmp_path / "long.txt"
    prompts.write_text("The history of the city begins with a small harbour, " * 6 + "and then\n")
    run = run_cli(["--device", "cpu", "--dtype", "float32", "--model", str(path), "--prompts", str(prompts),
                   "--positions", "2"], tmp_path / "r")
    r = run.report
    assert r["prompts"][0]["tokens"] > SPARSE["dense_len"]  # the prompt runs sparse
    assert run.code == 0, r["verdict"]
    checked = {c["op"] for c in r["conformance"]["cases"]}
    assert {"infllm_compress_keys", "infllm_select_blocks", "block_sparse_attention"} <= checked
    assert r["conformance"]["failed_ops"] == []


def test_the_float32_torch_ops_can_judge(tmp_path):
    path = write_checkpoint(tmp_path / "sparse", "tiny", overrides={"sparse_config": SPARSE})
    run = run_cli(["--device", "cpu", "--dtype", "float32", "--model", str(path), "--reference", "cpu-fp32-torch",
                   "--positions", "1"], tmp_path / "r")
    r = run.report
    assert run.code == 0 and r["reference"] == "cpu-fp32-torch" and "(torch ops)" in r["title"]
    assert {b["impl"] for b in r["reference_bound_ops"].values()} == {"cpu.torch"}
    # identical ops on both sides: identical numbers
    assert r["top1_prob_rel_err_max"] == 0.0
