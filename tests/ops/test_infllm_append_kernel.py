"""infllm_append_kernel: every CPU implementation against the float32 reference over the grid."""
from __future__ import annotations

import pytest
from cpu_conformance import assert_conforms, params


@pytest.mark.parametrize(("impl", "case"), params("infllm_append_kernel"))
def test_infllm_append_kernel_matches_reference(impl, case):
    assert_conforms(impl, case)
