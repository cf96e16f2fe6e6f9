"""Corpus mode: its statistics against numpy and hand computations, and one short run on tiny."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from compare_runner import run_cli

from validation import corpus, metrics


def test_quantiles_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 1000, 1234):
        values = rng.gamma(0.5, 1e-3, n).tolist()
        for q in (0.0, 0.5, 0.99, 0.999, 1.0):
            assert metrics.quantile(values, q) == pytest.approx(float(np.quantile(values, q)), rel=1e-12)
    d = metrics.distribution([4.0, 1.0, 3.0, 2.0])
    assert (d["mean"], d["median"], d["max"]) == (2.5, 2.5, 4.0)
    assert d["p99"] == pytest.approx(1 + 3 * 0.99 * 1)  # sorted 1,2,3,4: h = 3 * 0.99 = 2.97 -> 3 + 0.97


def test_perplexity_by_hand():
    # p(target) = 1/2, 1/4, 1/8: NLL ln2, 2 ln2, 3 ln2; mean 2 ln2; perplexity 4
    assert metrics.perplexity([math.log(2), 2 * math.log(2), 3 * math.log(2)]) == pytest.approx(4.0)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_token_scores_and_summary_match_numpy():
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(50, 40, generator=g) * 3
    dev = ref + 0.05 * torch.randn(50, 40, generator=g)
    dev[7] = torch.roll(ref[7], 1)  # one position where the device disagrees
    target = torch.randint(0, 40, (50,), generator=g)
    s = metrics.token_scores(ref, dev, target)
    lr, ld = _np_log_softmax(ref.double().numpy()), _np_log_softmax(dev.double().numpy())
    pr, pd = np.exp(lr), np.exp(ld)
    kl = (pr * (lr - ld)).sum(-1)
    rows = np.arange(50)
    np.testing.assert_allclose(s.kl.numpy(), kl, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(s.ref_nll.numpy(), -lr[rows, target.numpy()], rtol=1e-12)
    summary = corpus.summarize(s)
    top = pr.argmax(-1)
    dp = pd[rows, top] - pr[rows, top]
    assert summary["tokens_scored"] == 50
    assert summary["perplexity"]["reference"] == pytest.approx(np.exp(-lr[rows, target.numpy()].mean()), rel=1e-12)
    assert summary["perplexity"]["device"] == pytest.approx(np.exp(-ld[rows, target.numpy()].mean()), rel=1e-12)
    assert summary["same_top1_rate"] == pytest.approx(float((top == pd.argmax(-1)).mean()))
    assert summary["same_top1_rate"] < 1.0
    assert summary["delta_p_ref_top1"]["rms"] == pytest.approx(float(np.sqrt((dp ** 2).mean())), rel=1e-12)
    for key, q in (("median", 0.5), ("p99", 0.99), ("p99_9", 0.999)):
        assert summary["kl"][key] == pytest.approx(float(np.quantile(kl, q)), rel=1e-9)
    assert summary["kl"]["max"] == pytest.approx(kl.max()) and summary["kl"]["mean"] == pytest.approx(kl.mean())


def test_windows_cover_the_tokens_once():
    assert corpus.windows(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert corpus.windows(3, 512) == [(0, 3)]


def test_corpus_run_on_tiny(tiny_checkpoint, tmp_path):
    run = run_cli(["--device", "cpu", "--dtype", "bfloat16", "--model", str(tiny_checkpoint), "--corpus",
                   "--tokens", "40"], tmp_path / "r")
    assert run.code == 0, run.stderr
    r = run.report
    assert r["mode"] == "corpus" and r["schema_version"] == 2 and r["tokens_scored"] == 40
    assert r["corpus"]["source"].startswith("builtin") and r["corpus"]["tokens_in_text"] > 2000
    assert 0 < r["kl"]["median"] <= r["kl"]["p99"] <= r["kl"]["p99_9"] <= r["kl"]["max"]
    assert r["perplexity"]["reference"] > 1 and len(r["worst"]) == corpus.WORST
    assert r["worst"][0]["kl"] == r["kl"]["max"]
    assert "window 1/1" in run.stderr
    md = (run.report_dir / "report.md").read_text(encoding="utf-8")
    assert "Perplexity, device (bfloat16)" in md and "## Worst positions" in md


def test_corpus_windows_and_chunks_give_the_reference_its_own_numbers(tiny_checkpoint):
    """float32 torch ops judged by themselves over several windows and chunks: KL exactly 0."""
    s = corpus.CorpusSettings(model=tiny_checkpoint, tokens=150, device="cpu", dtype="float32",
                              reference="cpu-fp32-torch", window=70)
    r = corpus.run(s)
    assert r["settings"]["windows"] == 3 and r["tokens_scored"] == 150
    assert r["kl"]["max"] == 0.0 and r["same_top1_rate"] == 1.0
    assert r["perplexity"]["device"] == r["perplexity"]["reference"]


def test_corpus_bad_file_is_one_line(tiny_checkpoint, tmp_path):
    run = run_cli(["--device", "cpu", "--model", str(tiny_checkpoint), "--corpus", str(tmp_path / "none.txt")],
                  tmp_path / "r")
    assert run.code == 2 and "--corpus" in run.stderr and "not found" in run.stderr
    assert not (tmp_path / "r").exists()
