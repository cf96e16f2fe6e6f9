"""infllm_select_blocks: every CPU implementation against the float32 reference over the conformance grid."""
from __future__ import annotations

import pytest

from cpu_conformance import assert_conforms, params


@pytest.mark.parametrize(("impl", "case"), params("infllm_select_blocks"))
def test_infllm_select_blocks_matches_reference(impl, case):
    assert_conforms(impl, case)
