"""block_sparse_attention: every CPU implementation against the float32 reference over the conformance grid."""
from __future__ import annotations

import pytest

from cpu_conformance import assert_conforms, params


@pytest.mark.parametrize(("impl", "case"), params("block_sparse_attention"))
def test_block_sparse_attention_matches_reference(impl, case):
    assert_conforms(impl, case)
