"""linear_int4: every CPU implementation against the float32 reference (catalogue tolerance)."""
from __future__ import annotations

import pytest
from cpu_conformance import assert_conforms, params


@pytest.mark.parametrize(("impl", "case"), params("linear_int4"))
def test_linear_int4_matches_reference(impl, case):
    assert_conforms(impl, case)
