"""CPU speed of our MiniCPM vs transformers' folded ``LlamaForCausalLM`` on the 0.5b synthetic
checkpoint (same dtype, same torch threads, same prompt, greedy, each with its own KV cache),
and peak RSS at load. Not part of the default test run:

    python -m pytest benchmarks --benchmark-only

The closing section prints ours/transformers ratios; ``python -m benchmarks.cpu_speed`` prints
the same comparison as a table with ours and transformers interleaved round by round.
"""
from __future__ import annotations

import pytest

from benchmarks.cpu_speed import measure_rss, prompt_ids

PROMPT_TOKENS = 128
NEW_TOKENS = 32
ROUNDS = 3
DTYPES = ("float32", "bfloat16")
IMPLS = ("ours", "transformers")
RSS_LIMIT = 1.3


@pytest.mark.parametrize("dtype", DTYPES)
def test_load_peak_rss(benchmark, bench_checkpoint, record_rss, dtype: str) -> None:
    """Runs first (before any model is loaded here): a fresh subprocess loads the model."""
    data = benchmark.pedantic(measure_rss, args=(bench_checkpoint, dtype), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in data.items() if isinstance(v, (int, float))})
    record_rss(dtype, data)
    assert data["load_ratio"] <= RSS_LIMIT, f"peak RSS at load is {data['load_ratio']:.2f}x the weight bytes"
    assert data["forward_ratio"] <= RSS_LIMIT


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("phase", ("prefill", "decode"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_speed(benchmark, runners, record, dtype: str, phase: str, impl: str) -> None:
    """prefill: one forward over the prompt (fills the cache, last-position logits); decode:
    NEW_TOKENS greedy single-token forwards against the cache (prefill done in untimed setup)."""
    runner = runners.get(impl, dtype)
    ids = prompt_ids(runner.model.config.vocab_size, PROMPT_TOKENS)
    capacity = PROMPT_TOKENS + NEW_TOKENS + 1
    if phase == "prefill":
        benchmark.group = f"prefill {dtype} ({PROMPT_TOKENS} tokens)"
        benchmark.pedantic(runner.prefill, args=(ids, capacity), rounds=ROUNDS, iterations=1, warmup_rounds=1)
        tokens = PROMPT_TOKENS
    else:
        def setup():
            cache, first = runner.prefill(ids, capacity)
            return (cache, first, NEW_TOKENS), {}

        benchmark.group = f"decode {dtype} ({NEW_TOKENS} tokens after a {PROMPT_TOKENS}-token prompt)"
        benchmark.pedantic(runner.decode, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=1)
        tokens = NEW_TOKENS
    tok_s = tokens / benchmark.stats.stats.min
    benchmark.extra_info["tokens_per_s_best"] = tok_s
    record(dtype, phase, impl, tok_s)
