"""validation.compare does each piece of work once without changing a number: a GGUF file is parsed
once for all the models loaded from it, a floor that is the judge itself reuses the judge's logits,
and the per-position metrics check finiteness once. Each run here is set against the same run with
those shortcuts switched off (every model parses its file, every floor runs, every metric checks its
inputs): report.json must be equal but for the clock."""
from __future__ import annotations

import math

import pytest
import torch
from compare_runner import run_cli
from llamacpp_convert import MIXED_LINEAR_TYPES, tensor_types, write_minicpm_gguf

from model import gguf_checkpoint
from model.gguf_file import GGUFFile
from model.synthetic import write_checkpoint
from validation import floor, metrics

PROMPTS = "The capital of France is\nQuantum computing is\n"
CLOCK = ("created", "timing_s")
"""report.json fields that differ between two identical runs."""


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory):
    """The tiny synthetic model (float32) as a GGUF whose decoder linears are Q4_0 / Q4_1 / Q8_0."""
    root = tmp_path_factory.mktemp("shared")
    folder = write_checkpoint(root / "tiny", "tiny", seed=3, dtype="float32")
    return write_minicpm_gguf(folder, root / "q4.gguf", tensor_type=tensor_types(MIXED_LINEAR_TYPES))


def _old_position_metrics(p_ref, p_dev, k, tie_margin):
    """position_metrics as the public metrics define it, each checking its own inputs."""
    ref_top1 = int(p_ref.argmax())
    (p1, p2), (t1, t2) = (v.tolist() for v in torch.topk(p_ref, 2))
    return metrics.PositionMetrics(
        ref_top1=ref_top1, dev_top1=int(p_dev.argmax()), ref_top1_prob=float(p_ref[ref_top1]),
        dev_prob_of_ref_top1=float(p_dev[ref_top1]),
        top1_match=int(p_dev.argmax()) == ref_top1 and metrics.finite(p_ref, p_dev),
        top5_inclusion=metrics.top_inclusion(p_ref, p_dev, 5), topk_overlap=metrics.topk_overlap(p_ref, p_dev, k),
        topk_abs_errors=tuple(metrics.topk_abs_errors(p_ref, p_dev, k)), kl=metrics.kl_divergence(p_ref, p_dev),
        near_tie=metrics.near_tie(p_ref, tie_margin), ref_margin=p1 - p2,
        top2_swing=abs(float(p_dev[t1]) - p1) + abs(float(p_dev[t2]) - p2))


def _compare(args, folder, monkeypatch, shortcuts: bool):
    parsed = []
    init = GGUFFile.__init__

    def counting(self, path):
        parsed.append(path)
        init(self, path)

    with monkeypatch.context() as m:
        m.setattr(GGUFFile, "__init__", counting)
        if not shortcuts:
            m.setattr(gguf_checkpoint, "_SHARED", _NoScope())
            m.setattr(floor, "shares_weights", lambda model, judge: False)
            m.setattr(metrics, "position_metrics", _old_position_metrics)
        run = run_cli(args, folder)
    assert run.code == 0, run.stderr
    report = run.report
    return {k: v for k, v in report.items() if k not in CLOCK}, len(parsed), run.stderr


class _NoScope:
    """In place of parsed_once's context variable: no scope is ever active (every open parses)."""

    def get(self):
        return None

    def set(self, value):
        return None

    def reset(self, token):
        pass


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gguf_compare_parses_once_and_reports_what_it_did_before(q4_gguf, tmp_path, monkeypatch, dtype):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    args = ["--device", "cpu", "--dtype", dtype, "--model", str(q4_gguf), "--prompts", str(prompts),
            "--positions", "2"]
    before, parses_before, _ = _compare(args, tmp_path / "before", monkeypatch, shortcuts=False)
    after, parses_after, stderr = _compare(args, tmp_path / "after", monkeypatch, shortcuts=True)
    assert parses_before == 3 and parses_after == 1  # config (--threads default), reference, device
    assert after == before
    assert after["quantization"]["quantized"]  # the linears stayed quantized on both sides
    floors = {f["name"]: f for f in after["floor"]}
    if dtype == "float32":  # both floors are the judge: their logits are the reference's
        assert "rounded-ops (= the judge" in stderr and floors["rounded-ops"]["kl_max"] == 0.0
    else:  # a float32 checkpoint rounded to bfloat16 is a model of its own
        assert "(= the judge" not in stderr and floors["weights"]["kl_max"] > 0.0
    assert "op conformance:" in stderr and "reference loaded in" in stderr


def test_bf16_checkpoint_weights_floor_is_the_judge_and_reports_the_same(tiny_checkpoint, tmp_path, monkeypatch):
    """The built-in checkpoint is stored in bfloat16: rounding its weights changes nothing, so the
    ``weights`` floor is the judge itself (its KL is exactly 0 either way)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    args = ["--device", "cpu", "--dtype", "bfloat16", "--model", str(tiny_checkpoint), "--prompts", str(prompts),
            "--positions", "1"]
    before, _, _ = _compare(args, tmp_path / "before", monkeypatch, shortcuts=False)
    after, _, stderr = _compare(args, tmp_path / "after", monkeypatch, shortcuts=True)
    assert after == before
    assert "weights (= the judge" in stderr and "rounded-ops (= the judge" not in stderr
    assert {f["name"]: f["kl_max"] for f in after["floor"]}["weights"] == 0.0


def test_parsed_once_scope(q4_gguf, tmp_path, monkeypatch):
    """Outside a scope every open parses (and nothing is kept); inside, a file is parsed once, and
    parsed again once it is rewritten."""
    parsed = []
    init = GGUFFile.__init__
    monkeypatch.setattr(GGUFFile, "__init__", lambda self, path: (parsed.append(path), init(self, path))[1])
    assert gguf_checkpoint.open_checkpoint(q4_gguf) is not gguf_checkpoint.open_checkpoint(q4_gguf)
    assert len(parsed) == 2
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(q4_gguf.read_bytes())
    store: dict = {}
    with gguf_checkpoint.parsed_once(store):
        first = gguf_checkpoint.open_checkpoint(copy)
        with gguf_checkpoint.parsed_once():  # an inner scope uses the outer store
            assert gguf_checkpoint.open_checkpoint(copy) is first
        assert first.tokenizer_loader()("Paris")["input_ids"]  # built before the vocabulary was dropped
        assert len(parsed) == 3
        copy.write_bytes(q4_gguf.read_bytes() + b"\0" * 32)  # rewritten: another size
        assert gguf_checkpoint.open_checkpoint(copy) is not first
    assert len(parsed) == 4 and len(store) == 2
    assert not gguf_checkpoint.parsing_shared()


@pytest.mark.parametrize("poison", ["dev", "ref", "both"])
def test_position_metrics_on_non_finite_distributions_equal_the_public_metrics(poison):
    ref = torch.softmax(torch.linspace(3.0, -3.0, 12, dtype=torch.float64), dim=0)
    dev = torch.softmax(torch.linspace(2.5, -3.5, 12, dtype=torch.float64).flip(0), dim=0)
    if poison in ("dev", "both"):
        dev[3] = math.nan
    if poison in ("ref", "both"):
        ref[5] = math.inf
    new = metrics.position_metrics(ref, dev, 5, tie_margin=1.0)  # every finite reference is a near-tie
    old = _old_position_metrics(ref, dev, 5, tie_margin=1.0)
    assert repr(new) == repr(old)  # repr: NaN fields compare equal as text
    assert new.kl == math.inf and not new.top1_match and new.topk_overlap == 0
    assert new.near_tie == (poison == "dev")  # a NaN device does not make a finite reference's tie
