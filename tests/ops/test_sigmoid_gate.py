"""sigmoid_gate: every CPU implementation against the float32 reference over the conformance grid."""
from __future__ import annotations

import pytest
from cpu_conformance import assert_conforms, params


@pytest.mark.parametrize(("impl", "case"), params("sigmoid_gate"))
def test_sigmoid_gate_matches_reference(impl, case):
    assert_conforms(impl, case)
