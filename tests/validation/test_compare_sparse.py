"""validation.compare on an InfLLM-v2 checkpoint with a prompt past dense_len: the sparse path
is what gets compared, and its ops are checked on the model's shapes and geometry."""
from __future__ import annotations

from backends.cpu import QUANTIZED_LINEARS

import pytest
from compare_runner import run_cli

from model.synthetic import write_checkpoint
from expected_bindings import float32_cpu_linear

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
    """The torch-ops judge on a prompt past dense_len: its numbers (and the float32 device's) are
    the independent float64 InfLLM-v2 forward's (tests/infllm_reference.py)."""
    import torch
    from infllm_reference import minicpm_logits

    import hal

    path = write_checkpoint(tmp_path / "sparse", "tiny", dtype="float32", overrides={"sparse_config": SPARSE})
    prompt = "The history of the city begins with a small harbour, " * 6 + "and then"
    prompts = tmp_path / "long.txt"
    prompts.write_text(prompt + "\n")
    run = run_cli(["--device", "cpu", "--dtype", "float32", "--model", str(path), "--reference", "cpu-fp32-torch",
                   "--prompts", str(prompts), "--positions", "2"], tmp_path / "r")
    r = run.report
    assert run.code == 0 and r["reference"] == "cpu-fp32-torch" and "(torch ops)" in r["title"]
    assert {b["impl"] for op, b in r["reference_bound_ops"].items()
            if op not in QUANTIZED_LINEARS + ("linear", "logits")} == {"cpu.torch"}
    assert r["reference_bound_ops"]["linear"]["impl"] == float32_cpu_linear()
    assert r["reference_bound_ops"]["logits"]["impl"] == "cpu.onednn"
    ids = hal.load_model(path, "cpu", "float32").tokenizer(prompt)["input_ids"]
    assert len(ids) > SPARSE["dense_len"]
    positions = r["prompts"][0]["positions"]
    ids += [p["ref_top1"]["id"] for p in positions[:-1]]  # the teacher-forced tokens
    probs = torch.softmax(minicpm_logits(path, ids, sparse=True), -1)
    for pos in positions:
        p = probs[pos["position"]]
        assert pos["ref_top1"]["id"] == int(p.argmax()), pos["position"]
        assert pos["ref_top1"]["prob"] == pytest.approx(float(p.max()), rel=1e-5)
        assert pos["dev_prob_of_ref_top1"] == pytest.approx(float(p.max()), rel=1e-5)
