"""linear_ternary: every CPU implementation against the float32 reference (catalogue tolerance)."""
from __future__ import annotations

import pytest
from cpu_conformance import assert_conforms, params


@pytest.mark.parametrize(("impl", "case"), params("linear_ternary"))
def test_linear_ternary_matches_reference(impl, case):
    assert_conforms(impl, case)
