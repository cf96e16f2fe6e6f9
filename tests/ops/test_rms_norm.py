"""rms_norm: every CPU implementation against the float32 reference (catalogue tolerance)."""
from __future__ import annotations

import pytest
from cpu_conformance import assert_conforms, params


@pytest.mark.parametrize(("impl", "case"), params("rms_norm"))
def test_rms_norm_matches_reference(impl, case):
    assert_conforms(impl, case)
