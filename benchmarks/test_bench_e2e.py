"""pytest-benchmark suite: end-to-end prefill and decode of the default benchmark model per
backend, ours and transformers (sdpa) on the same weights, dtype and device:

    python -m pytest benchmarks/test_bench_e2e.py --benchmark-only [--bench-device cpu|cuda|npu|all]

prefill: one greedy generate of 1 token after a 252-token prompt; decode: 32 greedy tokens after
an 11-token prompt (seed 004's single request, shortened). Absent devices skip with the reason.
"""
from __future__ import annotations

import pytest

from benchmarks.conftest import BENCH_DEVICES
from benchmarks.suite import LONG_PROMPT, SINGLE_PROMPT, prompt_ids

CASES = {"prefill": (LONG_PROMPT, 1), "decode": (SINGLE_PROMPT, 32)}
_ENGINES: dict[tuple[str, str], object] = {}


def _engine(bench_model, device: str, impl: str):
    model = bench_model(device)  # skips an absent device
    if (device, impl) not in _ENGINES:
        from benchmarks.engines import OursEngine, TransformersEngine
        from benchmarks.run import default_model

        if impl == "ours":
            engine = OursEngine(default_model()[0], device, model.dtype, loaded=model)
        else:
            engine = TransformersEngine(default_model()[0], device, model.dtype)
        _ENGINES[(device, impl)] = engine
    return _ENGINES[(device, impl)], model.config.vocab_size


@pytest.mark.parametrize("impl", ("ours", "transformers-sdpa"))
@pytest.mark.parametrize("phase", tuple(CASES))
@pytest.mark.parametrize("device", BENCH_DEVICES)
def test_generate(benchmark, bench_model, device: str, phase: str, impl: str) -> None:
    engine, vocab = _engine(bench_model, device, impl)
    prompt_tokens, new_tokens = CASES[phase]
    prompt = [prompt_ids(vocab, prompt_tokens, seed=prompt_tokens)]
    benchmark.group = f"{device} {phase} ({prompt_tokens}-token prompt, {new_tokens} new)"
    run = benchmark.pedantic(engine.generate, args=(prompt, new_tokens), rounds=3, iterations=1, warmup_rounds=1)
    assert len(run.tokens[0]) == new_tokens
    benchmark.extra_info["tokens_per_s_best"] = (prompt_tokens if phase == "prefill" else new_tokens) \
        / benchmark.stats.stats.min
