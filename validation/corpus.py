"""Corpus mode of ``validation.compare`` (``--corpus FILE --tokens N``), what llama.cpp's
``llama-perplexity --kl-divergence`` gives its users: N tokens of a text are teacher-forced
through the reference and the device, and every position's next-token distribution is compared.

The text is tokenized once. Its first N + 1 tokens are cut into consecutive windows of at most
:data:`WINDOW` tokens (capped by max_position_embeddings); each window starts an empty KV cache
and is fed through it in chunks of :data:`CHUNK` tokens (the first chunk a prefill, the rest
attending over the cache), on both sides. Position i is scored against token i + 1, so N
positions are scored; the first tokens of each window see little context, the same on both sides.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from hal import probing as hal_devices
from hal.errors import InputError
from validation import environment, metrics
from validation.prompts import read_text

WINDOW = 512
CHUNK = 64
WORST = 10
CONTEXT = 16
BUILTIN = Path(__file__).with_name("data") / "corpus_en.txt"
"""The built-in English corpus (original prose written for this project), ``--corpus builtin``."""

Progress = Callable[[str], None]


def load_text(corpus: str) -> tuple[str, str]:
    """``builtin`` or a UTF-8 text file -> (label, text). One-line InputError when unusable."""
    path = BUILTIN if corpus == "builtin" else Path(corpus)
    label = "builtin (validation/data/corpus_en.txt)" if corpus == "builtin" else str(path)
    text = read_text(path, f"--corpus {corpus}")
    if not text.strip():
        raise InputError(f"--corpus {corpus}: the file holds no text")
    return label, text


def windows(count: int, window: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` spans covering ``0 .. count`` with at most ``window`` tokens."""
    return [(start, min(start + window, count)) for start in range(0, count, window)]


def _logits_cached(model: Any, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """ids `[1, W]` through a fresh KV cache ``chunk`` tokens at a time -> logits `[W, V]` float32 (CPU)."""
    cache = model.new_cache(1, ids.shape[1])
    out = []
    for start in range(0, ids.shape[1], chunk):
        step = model.forward(ids[:, start:start + chunk].to(model.device), cache=cache)
        out.append(step.logits[0].float().cpu())
    return torch.cat(out, dim=0)


def _reference_logits(reference: Any, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    if hasattr(reference, "model"):  # our model: the same cached protocol as the device
        return _logits_cached(reference.model, ids, chunk)
    return reference.run(ids)[0].float()  # transformers: one forward per window


@dataclass
class CorpusSettings:
    """What a corpus run depends on (the CLI fills it). corpus: ``builtin`` or a file path."""

    model: Path
    corpus: str = "builtin"
    tokens: int = 1024
    device: str = "auto"
    dtype: str = "bfloat16"
    reference: str = "cpu-fp32"
    trust_remote_code: bool = False
    allow_fallback: bool = False
    fault: str | None = None
    window: int = WINDOW


def summarize(scores: metrics.TokenScores) -> dict[str, Any]:
    """The corpus summary of per-position scores (see README: report.json, corpus mode)."""
    kl = scores.kl.tolist()
    dp = (scores.dev_prob_of_ref_top1 - scores.ref_top1_prob).tolist()
    ppl_ref = metrics.perplexity(scores.ref_nll.tolist())
    ppl_dev = metrics.perplexity(scores.dev_nll.tolist())
    return {
        "tokens_scored": len(kl),
        "perplexity": {"reference": ppl_ref, "device": ppl_dev, "ratio": ppl_dev / ppl_ref},
        "kl": metrics.distribution(kl),
        "same_top1_rate": metrics.mean((scores.ref_top1 == scores.dev_top1).double().tolist()),
        "delta_p_ref_top1": {"rms": metrics.rmse(dp), "mean": metrics.mean(dp),
                             "max_abs": max(abs(v) for v in dp)},
    }


def _worst(scores: metrics.TokenScores, ids: list[int], tok: Callable[[int], str], decode: Callable[[list[int]], str],
           count: int) -> list[dict[str, Any]]:
    order = torch.argsort(scores.kl, descending=True)[:count].tolist()
    out = []
    for i in order:
        out.append({"position": i, "kl": float(scores.kl[i]),
                    "context": decode(ids[max(0, i + 1 - CONTEXT):i + 1]),
                    "next_token": tok(ids[i + 1]),
                    "ref_top1": {"id": int(scores.ref_top1[i]), "token": tok(int(scores.ref_top1[i])),
                                 "prob": float(scores.ref_top1_prob[i])},
                    "dev_top1": {"id": int(scores.dev_top1[i]), "token": tok(int(scores.dev_top1[i]))},
                    "dev_prob_of_ref_top1": float(scores.dev_prob_of_ref_top1[i]),
                    "ref_nll": float(scores.ref_nll[i]), "dev_nll": float(scores.dev_nll[i])})
    return out


def run(settings: CorpusSettings, progress: Progress = lambda _: None) -> dict[str, Any]:
    """Teacher-force the corpus through reference and device; return the report dict."""
    from validation import harness

    if settings.tokens < 1:
        raise InputError(f"--tokens must be >= 1, got {settings.tokens}")
    label, text = load_text(settings.corpus)
    t0 = time.perf_counter()
    load_settings = harness.Settings(model=settings.model, device=settings.device, dtype=settings.dtype,
                                     reference=settings.reference, trust_remote_code=settings.trust_remote_code,
                                     allow_fallback=settings.allow_fallback, fault=settings.fault)
    reference, model, kind = harness._load(load_settings, progress, None)
    t_load = time.perf_counter() - t0
    tokenizer = model.tokenizer
    all_ids = list(tokenizer(text)["input_ids"])
    if len(all_ids) < 2:
        raise InputError(f"--corpus {settings.corpus}: encodes to {len(all_ids)} token(s); at least 2 are needed")
    scored = min(settings.tokens, len(all_ids) - 1)
    if scored < settings.tokens:
        progress(f"the corpus has {len(all_ids)} tokens: scoring {scored}, not {settings.tokens}")
    ids = all_ids[:scored + 1]
    window = max(1, min(settings.window, model.config.max_position_embeddings))
    spans = windows(scored, window)
    parts: list[metrics.TokenScores] = []
    t1 = time.perf_counter()
    for number, (start, end) in enumerate(spans, 1):
        chunk_ids = torch.tensor([ids[start:end]], dtype=torch.long)
        model.check_input_ids(chunk_ids)
        target = torch.tensor(ids[start + 1:end + 1], dtype=torch.long)
        ref = _reference_logits(reference, chunk_ids, CHUNK)
        dev = _logits_cached(model, chunk_ids, CHUNK)
        parts.append(metrics.token_scores(ref, dev, target))
        done = end
        kl_so_far = float(torch.cat([p.kl for p in parts]).mean())
        rate = done / (time.perf_counter() - t1)
        progress(f"window {number}/{len(spans)}: {done}/{scored} tokens, KL mean so far {kl_so_far:.3e}, "
                 f"{rate:.1f} tok/s")
    t_run = time.perf_counter() - t1
    scores = metrics.TokenScores(*(torch.cat([getattr(p, f) for p in parts])
                                   for f in metrics.TokenScores.__dataclass_fields__))

    def tok(i: int) -> str:
        return harness._token_text(tokenizer, i)

    emulated = harness.is_emulated(kind)
    description = hal_devices.probe(kind).description
    dtype = harness.dtype_name(model.dtype)
    return {
        "schema": harness.SCHEMA,
        "schema_version": harness.SCHEMA_VERSION,
        "mode": "corpus",
        "title": f"Corpus report: {kind}{' (EMULATED)' if emulated else ''} {dtype} vs CPU float32 reference",
        "emulated": emulated,
        **harness.run_fields(kind, description, emulated, dtype, reference.name),
        "fault": settings.fault,
        "corpus": {"source": label, "characters": len(text), "tokens_in_text": len(all_ids),
                   "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()},
        "settings": {"tokens": settings.tokens, "window": window, "chunk": CHUNK, "windows": len(spans)},
        **summarize(scores),
        "worst": _worst(scores, ids, tok, lambda span: tokenizer.decode(span), WORST),
        "bound_ops": model.ops.as_dict(),
        "reference_bound_ops": reference.bound_ops,
        "model": {"path": str(settings.model), "architecture": (model.config.raw.get("architectures") or ["?"])[0],
                  "parameters": harness._parameter_count(model)},
        "environment": environment.collect(description),
        "timing_s": {"load": round(t_load, 3), "run": round(t_run, 3),
                     "tokens_per_s": round(scored / t_run, 2) if t_run > 0 else None},
    }
