"""What the registry must bind on this machine where the rule depends on the CPU, written once for
the tests that check a binding."""
from __future__ import annotations

from backends.cpu import linear_onednn


def float32_cpu_linear() -> str:
    """The float32 ``linear`` on this CPU: ``cpu.onednn`` (priority -2) where its CPU rule lets it
    serve (``linear_onednn.cpu_reason()`` is None: a oneDNN build, torch dispatching below AVX-512),
    else ``cpu.torch_kn`` (benchmarks/RESULTS.md, "CPU decode (issue 13)": the faster kernel on each)."""
    return "cpu.torch_kn" if linear_onednn.cpu_reason() else "cpu.onednn"
