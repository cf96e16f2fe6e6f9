"""pytest-benchmark suite: every bound op of the default benchmark model on its shapes (prefill
T = 252, decode T = 1 against 253 cached keys), per backend, torch SDPA beside the attention ops:

    python -m pytest benchmarks/test_bench_ops.py --benchmark-only [--bench-device cpu|cuda|npu|all]

Devices that are absent (or not selected) skip with the reason. The cases are
``benchmarks/suite.py``'s, the same as the ops table of ``python -m benchmarks.run``.
"""
from __future__ import annotations

import pytest

from benchmarks.conftest import BENCH_DEVICES
from benchmarks.suite import SDPA_OPS, op_call, op_cases, op_labels


def _case(model, label: str):
    return dict(op_cases(model))[label]


@pytest.mark.parametrize("label", op_labels())
@pytest.mark.parametrize("device", BENCH_DEVICES)
def test_op(benchmark, bench_model, device: str, label: str) -> None:
    from benchmarks.engines import synchronizer

    model = bench_model(device)
    c = _case(model, label)
    if c.op not in model.bound_ops:
        pytest.skip(f"{c.op} is not bound for this model")
    ours, _ = op_call(model, c)
    sync = synchronizer(device)
    benchmark.group = f"{device} {label}"
    benchmark.extra_info.update(impl=model.bound_ops[c.op], case=c.label)
    benchmark.pedantic(lambda: (ours(), sync()), rounds=10, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("label", [l for l in op_labels() if l.split()[1] in SDPA_OPS])
@pytest.mark.parametrize("device", BENCH_DEVICES)
def test_torch_sdpa_baseline(benchmark, bench_model, device: str, label: str) -> None:
    from benchmarks.engines import synchronizer

    model = bench_model(device)
    _, sdpa = op_call(model, _case(model, label))
    sync = synchronizer(device)
    benchmark.group = f"{device} {label}"
    benchmark.extra_info["baseline"] = "torch.nn.functional.scaled_dot_product_attention"
    benchmark.pedantic(lambda: (sdpa(), sync()), rounds=10, iterations=1, warmup_rounds=1)
