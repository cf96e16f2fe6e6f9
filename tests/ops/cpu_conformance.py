"""Shared by tests/ops: every registered CPU implementation (the reference itself excluded)
against the float32 reference over the conformance grid, tolerances from the catalogue."""
from __future__ import annotations

import pytest

from hal.registry import implementations
from validation.grid import grid
from validation.opcheck import check_impl


def params(op: str) -> list:
    """pytest params ``(impl, case)`` with ids like ``cpu.torch-B1-T63-E60-bf16``."""
    impls = [i for i in implementations(op, "cpu") if i.name != "reference"]
    return [pytest.param(impl, c, id=f"{impl.qualname}-{c.test_id}") for impl in impls for c in grid(op)]


def assert_conforms(impl, c) -> None:
    result = check_impl(c, impl, "cpu")
    if result.status == "not supported":
        pytest.skip(result.reason)
    assert result.status == "ok", result.line()  # the conformance CLI's line
