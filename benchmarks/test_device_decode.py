"""Device decode benchmarks for the CI matrix (cpu / cuda / npu), each printing a ratio against a
baseline measured in the same run:

    python -m pytest benchmarks/test_device_decode.py --benchmark-only --bench-device npu

* decode graph vs eager decode, greedy, batch 1 (cuda / npu; skipped on cpu, which has no
  graphs): ``benchmarks/decode_graph.py``'s measurement on the ``--bench-preset`` checkpoint.
* one InfLLM-v2 decode step vs dense decode attention at 32k cached keys (every device):
  ``benchmarks/sparse_decode.py``'s measurement, run on the CPU implementations; on cuda / npu
  it times the portable torch ops on that device.
"""
from __future__ import annotations

import pytest

_RATIOS: dict[str, float] = {}


@pytest.fixture(scope="session")
def bench_device(request) -> str:
    from hal.probing import resolve

    return resolve(request.config.getoption("--bench-device"))


def _label(device: str) -> str:
    from hal import env

    return f"{device} (EMULATED: CPU times, not hardware)" if device == "npu" and env.npu_emulate() else device


def test_decode_graph_vs_eager(benchmark, bench_device, request):
    if bench_device == "cpu":
        pytest.skip("cpu has no device graphs")
    import hal
    from benchmarks.decode_graph import measure
    from model.synthetic import default_checkpoint

    model = hal.load_model(default_checkpoint(request.config.getoption("--bench-preset")), bench_device, "bfloat16")
    result = benchmark.pedantic(measure, args=(model, 64), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    _RATIOS[f"{_label(bench_device)} decode graph / eager tokens/s"] = float(result["graph_over_eager"])


def test_sparse_decode_step_vs_dense(benchmark, bench_device):
    from benchmarks.sparse_decode import measure

    result = benchmark.pedantic(measure, args=(32768, 5), kwargs={"device": bench_device}, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    _RATIOS[f"{_label(bench_device)} InfLLM-v2 decode step speed-up over dense at 32k keys"] = \
        result["dense"] / result["sparse"]


def ratios() -> dict[str, float]:
    return dict(_RATIOS)
