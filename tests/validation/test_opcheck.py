"""The NMSE check and its failure modes (NaN, inf, wrong shape, exceptions)."""
from __future__ import annotations

import math

import pytest
import torch

from backends.cpu.reference.rms_norm import rms_norm_ref
from validation.opcheck import case, check, make_inputs, nmse


def test_nmse_known_answers():
    assert nmse(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0])) == pytest.approx(1 / 5)
    assert nmse(torch.tensor([1.0, -2.0]), torch.tensor([1.0, -2.0])) == 0.0
    assert nmse(torch.zeros(3), torch.zeros(3)) == 0.0
    assert math.isinf(nmse(torch.zeros(3), torch.ones(3)))


def test_nmse_nan_and_inf_checks():
    assert math.isinf(nmse(torch.tensor([1.0, 2.0]), torch.tensor([1.0, float("nan")])))
    inf = float("inf")
    assert math.isinf(nmse(torch.tensor([1.0, inf]), torch.tensor([1.0, -inf])))
    assert nmse(torch.tensor([1.0, inf]), torch.tensor([1.0, inf])) == 0.0


def test_inputs_are_rounded_to_the_case_dtype():
    args = make_inputs(case("rms_norm", "bfloat16", B=1, T=3, E=8))
    assert args["x"].dtype == torch.float32
    assert torch.equal(args["x"], args["x"].bfloat16().float())


def test_check_passes_the_reference_and_flags_a_wrong_op():
    c = case("rms_norm", "bfloat16", B=1, T=5, E=64)
    assert check(c, rms_norm_ref).status == "ok"
    wrong = check(c, lambda x, weight, eps: rms_norm_ref(x, weight, eps) * 1.01)
    assert wrong.status == "FAIL" and wrong.error > wrong.tolerance
    assert "rms_norm" in wrong.line() and "FAIL" in wrong.line()


def test_check_reports_errors_and_shapes_instead_of_raising():
    c = case("swiglu", "float32", B=1, T=4, F=16)

    def broken(gate, up):
        raise RuntimeError("kernel exploded\nsecond line")

    result = check(c, broken)
    assert result.status == "error" and result.reason == "RuntimeError: kernel exploded"
    assert check(c, lambda gate, up: gate[..., :-1]).status == "FAIL"


def test_tuple_outputs_are_each_checked():
    from backends.cpu.reference.rms_norm import add_rms_norm_ref

    c = case("add_rms_norm", "float32", B=1, T=3, E=32)

    def bad_residual(x, residual, weight, eps, scale):
        y, r = add_rms_norm_ref(x, residual, weight, eps, scale)
        return y, r + 1.0

    result = check(c, bad_residual)
    assert result.status == "FAIL" and result.output == "new_residual"
