"""The op tolerances: pinned to the documented table (hal/README.md, "Op tolerances"), and shown
to be tight with validation/opcheck.py's own NMSE check: the float32 reference's output,
perturbed by a few ulps of its dtype, passes; perturbed by a realistic bug, fails.

Per output dtype (the bugs, and why they are realistic, are in the README's table notes):
    float32:  +-8 ulps of random sign passes; the output rounded to float16 (an op computing
              in half precision inside) fails. NMSE of that rounding ~1e-7: it would pass a
              1e-5 bound.
    bfloat16: +-1 ulp on a random half of the elements passes; a systematic 2% error (a dropped
              LongRoPE mscale, a softmax scale off by 2%) fails.
    float16:  the same +-1 ulp passes; a systematic 0.2% error fails.
    exact (0): the reference itself passes; one element moved by one ulp (ids: one id) fails.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from hal.ops import CATALOGUE, get_spec
from validation.grid import grid
from validation.opcheck import check, reference_fn

README = Path(__file__).resolve().parents[1] / "hal" / "README.md"
DTYPES = ("float32", "bfloat16", "float16")
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def documented() -> dict[tuple[str, str], dict[str, float | None]]:
    """(op, output) -> {dtype: bound or None (dtype not in the contract)} from the README table."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Op tolerances", 1)[1]
    table: dict[tuple[str, str], dict[str, float | None]] = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`(\w+)`\s*\|\s*`(\w+)`\s*\|(.*)\|\s*$", line)
        if m:
            cells = [c.strip() for c in m.group(3).split("|")]
            assert len(cells) == len(DTYPES), line
            table[(m.group(1), m.group(2))] = {d: None if c == "—" else float(c) for d, c in zip(DTYPES, cells)}
    return table


def test_every_tolerance_is_the_documented_one():
    table = documented()
    declared = {(spec.name, out) for spec in CATALOGUE.values() for out in spec.outputs}
    assert set(table) == declared, f"undocumented: {declared - set(table)}; stale: {set(table) - declared}"
    for (op, out), row in table.items():
        spec = get_spec(op)
        for dtype in DTYPES:
            if dtype in spec.dtypes:
                assert spec.tolerance(dtype, out) == row[dtype], f"{op}.{out} {dtype}: hal/ops.py " \
                    f"says {spec.tolerance(dtype, out)}, hal/README.md {row[dtype]}"
            else:
                assert row[dtype] is None, f"{op} has no {dtype} contract but the table gives {row[dtype]}"


def _ulps(t: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Every finite element moved by ``count`` ulps of its own dtype, random direction."""
    g = torch.Generator().manual_seed(seed)
    bits = t.contiguous().view(INT_VIEW[t.dtype]).clone()
    step = (torch.randint(0, 2, t.shape, generator=g) * 2 - 1) * count
    moved = (bits.long() + step).to(bits.dtype).view(t.dtype)
    return torch.where(torch.isfinite(t) & torch.isfinite(moved), moved, t)


def _one_ulp_once(t: torch.Tensor) -> torch.Tensor:
    """The first finite non-zero element moved one ulp away from zero."""
    bits = t.contiguous().view(INT_VIEW[t.dtype]).clone().view(-1)
    flat = t.reshape(-1)
    i = int(torch.nonzero(torch.isfinite(flat) & (flat != 0))[0])
    bits[i] += 1
    return bits.view(t.dtype).view(t.shape)


def perturbed(kind: str, t: torch.Tensor, seed: int) -> torch.Tensor:
    """``kind``: "ulps" (within tolerance) or "bug" (outside it), per the module docstring."""
    if not t.is_floating_point():
        if kind == "ulps":
            return t
        out = t.clone()
        out.view(-1)[0] = out.view(-1)[0] + 1  # one id off (a block id, a sampled token)
        return out
    if kind == "ulps":
        if t.dtype == torch.float32:
            return _ulps(t, 8, seed)
        half = torch.rand(t.shape, generator=torch.Generator().manual_seed(seed + 7)) < 0.5
        return torch.where(half, _ulps(t, 1, seed), t)
    if t.dtype == torch.float32:
        return t.half().float()
    return (t.float() * (1.02 if t.dtype == torch.bfloat16 else 1.002)).to(t.dtype)


def _faulty(op: str, kind: str, exact: bool) -> Callable[..., Any]:
    """The reference, its outputs perturbed (exact ops: "bug" moves one element by one ulp)."""
    ref = reference_fn(op)
    spec = get_spec(op)

    def change(t: torch.Tensor, seed: int) -> torch.Tensor:
        if exact and t.is_floating_point():
            return t if kind == "ulps" else _one_ulp_once(t)
        return perturbed(kind, t, seed)

    def fn(**args: Any) -> Any:
        value = ref(**args)
        if spec.inplace:
            for seed, name in enumerate(spec.outputs):
                args[name].copy_(change(args[name], seed))
            return None
        if isinstance(value, tuple):
            return tuple(change(v, seed) for seed, v in enumerate(value))
        return change(value, 0)

    return fn


CASES = [(op, dtype) for op, spec in CATALOGUE.items() for dtype in spec.dtypes]


@pytest.mark.parametrize(("op", "dtype"), CASES, ids=[f"{op}-{d}" for op, d in CASES])
def test_tolerance_is_tight(op, dtype):
    case = grid(op, [dtype])[0]
    spec = get_spec(op)
    exact = all(spec.tolerance(dtype, out) == 0.0 for out in spec.outputs)
    within = check(case, _faulty(op, "ulps", exact), "ulps")
    assert within.status == "ok", within.line()
    bug = check(case, _faulty(op, "bug", exact), "bug")
    assert bug.status == "FAIL", bug.line()
