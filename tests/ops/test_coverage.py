"""Every catalogue op has conformance cases and at least one CPU implementation under test, and
the check catches a subtly wrong implementation (so the op tests can fail)."""
from __future__ import annotations

import pytest
import torch
from cpu_conformance import params

from hal.ops import CATALOGUE
from validation.opcheck import case, check


@pytest.mark.parametrize("op", list(CATALOGUE))
def test_every_catalogue_op_is_tested_on_cpu(op):
    assert params(op), f"{op}: no CPU implementation or no conformance cases"


def _greedy_highest_index_on_ties(logits, temperature, top_k, top_p, generator):
    """argmax of the reversed row: the highest index wins a tie (the contract says lowest)."""
    return logits.shape[-1] - 1 - logits.flip(-1).argmax(-1)


def test_tie_breaking_error_is_caught_only_by_the_ties_case():
    ties = case("sample", "float32", ("ties",), B=2, V=1000)
    assert check(ties, _greedy_highest_index_on_ties).status == "FAIL"
    assert check(case("sample", "float32", B=2, V=1000), _greedy_highest_index_on_ties).status == "ok"


def test_padding_error_is_caught_by_the_padded_case():
    from backends.cpu.ops import attention_prefill_cpu

    def ignores_padding(q, k, v, kv_start, scale):
        return attention_prefill_cpu(q, k, v, None, scale)

    padded = case("attention_prefill", "float32", ("padded",), B=2, T=13, H=4, Hk=2, D=64)
    assert check(padded, ignores_padding).status == "FAIL"
    assert check(padded, attention_prefill_cpu).status == "ok"


def test_reading_past_kv_lens_is_caught_by_the_ragged_case():
    from backends.cpu.ops import attention_decode_cpu

    def reads_to_the_longest_row(q, k_cache, v_cache, kv_lens, scale):
        return attention_decode_cpu(q, k_cache, v_cache, kv_lens.max().expand_as(kv_lens), scale)

    ragged = case("attention_decode", "float32", ("ragged",), B=2, T=1, S=20, C=128, H=4, Hk=2, D=64)
    assert check(ragged, reads_to_the_longest_row).status == "FAIL"
    assert check(ragged, attention_decode_cpu).status == "ok"


def test_writing_skipped_slots_is_caught_by_the_padded_case():
    from backends.cpu.ops import kv_write_cpu

    def writes_minus_one_as_last(k_cache, v_cache, k, v, slots):
        rows = torch.arange(slots.shape[0])[:, None].expand_as(slots)
        k_cache[rows, slots] = k  # python indexing: -1 is the last position
        v_cache[rows, slots] = v

    padded = case("kv_write", "float32", ("padded",), B=2, T=13, C=128, Hk=1, D=64)
    assert check(padded, writes_minus_one_as_last).status == "FAIL"
    assert check(padded, kv_write_cpu).status == "ok"
