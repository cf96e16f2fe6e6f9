"""The shared conformance grid (validation/grid.py, the cases `python -m validation.conformance`
runs) for every NPU implementation on the emulator, tolerances from the catalogue: the same cases
the CPU implementations pass in tests/ops."""
from __future__ import annotations

import pytest

from hal.ops import CATALOGUE
from hal.registry import implementations
from validation.grid import grid
from validation.opcheck import check_impl

PARAMS = [pytest.param(impl, c, id=f"{impl.qualname}-{c.test_id}")
          for op in CATALOGUE for impl in implementations(op, "npu") for c in grid(op)]


@pytest.mark.parametrize(("impl", "case"), PARAMS)
def test_npu_impl_conforms_on_the_shared_grid(emulated, impl, case):
    result = check_impl(case, impl, "npu")
    if result.status == "not supported":
        pytest.skip(result.reason)
    assert result.status == "ok", result.line()  # the conformance CLI's line
