"""Every implementation marked ``capturable`` passes the shared conformance grid when it runs
captured in the emulated NPUGraph and is replayed on other inputs (validation/capture.py);
the decode-path implementations not marked capturable are caught by the same check."""
from __future__ import annotations

import pytest

from backends.npu import emulator
from hal.ops import CATALOGUE
from hal.probing import reset as reset_probes
from hal.registry import implementations
from validation.capture import check_captured
from validation.grid import grid


def _impls(capturable: bool, ops=CATALOGUE):
    seen, found = set(), []
    for op in ops:
        for impl in implementations(op):
            # Triton launches are no aten ops, which the emulated graph records: tests/cuda
            # captures those kernels in a real CUDA graph (GPU) and checks them for host reads (CPU)
            triton = impl.name == "triton"
            if impl.capturable == capturable and impl.name != "reference" and not triton and (op, impl.fn) not in seen:
                seen.add((op, impl.fn))  # cuda borrows the cpu functions: test each function once
                found.append(impl)
    return found


def _run_on(impl, monkeypatch) -> str:
    if impl.backend == "npu":
        monkeypatch.setenv("HAL_NPU_EMULATE", "1")
        reset_probes()
        return "npu"
    return "cpu"


@pytest.fixture(autouse=True)
def _uninstall_emulator():
    yield
    emulator.uninstall()
    reset_probes()


CAPTURABLE = [pytest.param(impl, c, id=f"{impl.qualname}-{impl.op}-{c.test_id}")
              for impl in _impls(True) for c in grid(impl.op)]


@pytest.mark.parametrize(("impl", "case"), CAPTURABLE)
def test_capturable_impl_conforms_when_captured_and_replayed(impl, case, monkeypatch):
    result = check_captured(case, impl, _run_on(impl, monkeypatch))
    if result.status == "not supported":
        pytest.skip(result.reason)
    assert result.status == "ok", result.line()


NOT_CAPTURABLE = _impls(False, ("attention_decode", "kv_write"))


@pytest.mark.parametrize("impl", NOT_CAPTURABLE, ids=lambda i: f"{i.qualname}-{i.op}")
def test_host_reading_decode_impls_fail_the_capture_check(impl, monkeypatch):
    device = _run_on(impl, monkeypatch)
    results = [check_captured(c, impl, device) for c in grid(impl.op, ["bfloat16"])]
    judged = [r for r in results if r.status != "not supported"]
    assert judged, "no grid case to judge"
    assert any(r.status == "error" and "not permitted while capturing" in r.reason for r in judged), \
        [r.line() for r in judged]
