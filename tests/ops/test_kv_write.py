"""kv_write: every CPU implementation against the float32 reference (exact, in place)."""
from __future__ import annotations

import pytest
from cpu_conformance import assert_conforms, params


@pytest.mark.parametrize(("impl", "case"), params("kv_write"))
def test_kv_write_matches_reference(impl, case):
    assert_conforms(impl, case)
