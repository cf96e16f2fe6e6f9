"""pytest-benchmark plumbing for ``benchmarks/``: shared runners, the per-device benchmark model
(``bench_model``: test_bench_ops.py, test_bench_e2e.py), and a closing table of tokens/s ratios
ours/transformers (from each benchmark's best round).

Run with ``python -m pytest benchmarks --benchmark-only`` (not part of the default test run);
``--bench-device cpu|cuda|npu|all`` picks the device (absent devices skip with the reason)."""
from __future__ import annotations

from typing import Any

import pytest

_RESULTS: dict[tuple[str, str, str], float] = {}
_RSS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="session")
def bench_checkpoint():
    """The 0.5b synthetic checkpoint (written into the cache folder on first use)."""
    from benchmarks.cpu_speed import checkpoint

    return checkpoint()


class _Runners:
    """Loads runners lazily, keeping one dtype in memory at a time."""

    def __init__(self, path):
        self.path = path
        self.dtype: str | None = None
        self.loaded: dict[str, Any] = {}

    def get(self, impl: str, dtype: str) -> Any:
        from benchmarks.cpu_speed import RUNNERS

        if dtype != self.dtype:
            self.loaded.clear()
            self.dtype = dtype
        if impl not in self.loaded:
            self.loaded[impl] = RUNNERS[impl](self.path, dtype)
        return self.loaded[impl]


@pytest.fixture(scope="session")
def runners(bench_checkpoint) -> _Runners:
    return _Runners(bench_checkpoint)


@pytest.fixture(scope="session")
def record():
    """record(dtype, phase, impl, tokens_per_second) for the closing ratio table."""

    def _record(dtype: str, phase: str, impl: str, tok_s: float) -> None:
        _RESULTS[(dtype, phase, impl)] = tok_s

    return _record


@pytest.fixture(scope="session")
def record_rss():
    def _record(dtype: str, data: dict[str, float]) -> None:
        _RSS[dtype] = data

    return _record


def pytest_addoption(parser) -> None:
    parser.addoption("--bench-device", default="cpu", help="device of the device benchmarks: cpu, cuda, npu, auto (test_bench_*.py: also all)")
    parser.addoption("--bench-preset", default="0.5b", help="synthetic checkpoint of the decode-graph benchmark")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    from benchmarks.test_device_decode import ratios

    write = terminalreporter.write_line
    if ratios():
        terminalreporter.section("minicpm-hal device decode: ratios against a baseline of the same run")
        for name, value in ratios().items():
            write(f"{name}: {value:.2f}x")
    if not _RESULTS and not _RSS:
        return
    terminalreporter.section("minicpm-hal vs transformers: tokens/s ratios (best round) and load memory")
    for dtype in ("float32", "bfloat16"):
        for phase in ("prefill", "decode"):
            ours = _RESULTS.get((dtype, phase, "ours"))
            theirs = _RESULTS.get((dtype, phase, "transformers"))
            if ours and theirs:
                write(f"{dtype:9s} {phase:8s} ours {ours:8.1f} tok/s  transformers {theirs:8.1f} tok/s  "
                      f"ratio {ours / theirs:.2f}x")
    for dtype, data in _RSS.items():
        write(f"{dtype:9s} peak RSS at load - baseline = {data['load_ratio']:.2f}x weight bytes "
              f"({data['weight_bytes'] / 2**20:.0f} MiB); after a first forward {data['forward_ratio']:.2f}x")


BENCH_DEVICES = ("cpu", "cuda", "npu")


@pytest.fixture(scope="session")
def bench_model(request):
    """bench_model(device) -> the default benchmark model (``benchmarks.run.default_model``: the
    trained SmolLM2-135M where fetched, else tiny) loaded on ``device`` in its default dtype, one
    per device; skips when the device is absent or not the one ``--bench-device`` selects."""
    loaded: dict[str, Any] = {}
    selected = request.config.getoption("--bench-device")

    def get(device: str):
        from hal.probing import probe

        if selected not in ("all", "auto", device):
            pytest.skip(f"{device}: not selected (--bench-device {selected})")
        found = probe(device)
        if not found.available:
            pytest.skip(f"{device} is not available here: {found.reason}")
        if device not in loaded:
            import hal
            from benchmarks.run import default_model

            loaded[device] = hal.load_model(default_model()[0], device)
        return loaded[device]

    return get
