"""The pass rule of ``validation.compare`` and its configurable thresholds.

A run passes when
  1. the device's top-1 token equals the reference's at every compared position, except at
     near-ties (reference top-1 minus top-2 probability < ``near_tie_margin``), which are
     reported as near-ties, not failures; and
  2. the mean relative error of the reference top-1 token's probability is
     < ``top1_prob_rel_err_mean``; and
  3. (only if ``ops_must_conform`` is 1) every bound op meets its catalogue NMSE tolerance.
Per-layer drift past ``drift_rel_l2`` is reported (the first such layer is named) but does not
fail a run: it explains a failure, it is not one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Sequence

from hal.errors import InputError

DRIFT_DEFAULTS = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass(frozen=True)
class Thresholds:
    """top1_prob_rel_err_mean: fail at or above this mean (fraction; 0.01 = 1 %).
    near_tie_margin: reference p(top-1) - p(top-2) below this is a near-tie (probability units).
    drift_rel_l2: per-layer relative L2 drift that names a layer (None: by dtype, see
    ``DRIFT_DEFAULTS``). ops_must_conform: 1 makes an op conformance failure fail the run."""

    top1_prob_rel_err_mean: float = 0.01
    near_tie_margin: float = 0.02
    drift_rel_l2: float | None = None
    ops_must_conform: float = 0.0

    def for_dtype(self, dtype: str) -> Thresholds:
        if self.drift_rel_l2 is not None:
            return self
        return replace(self, drift_rel_l2=DRIFT_DEFAULTS.get(dtype, DRIFT_DEFAULTS["bfloat16"]))

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def parse_overrides(items: Sequence[str], base: Thresholds | None = None) -> Thresholds:
    """``["near_tie_margin=0.05", "top1_prob_rel_err_mean=0.02,drift_rel_l2=0.1"]`` -> Thresholds.

    Raises :class:`InputError` naming the bad item and the known keys."""
    known = {f.name for f in fields(Thresholds)}
    values: dict[str, float] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            key, sep, raw = part.partition("=")
            key = key.strip()
            if not sep or key not in known:
                raise InputError(f"--thresholds: expected KEY=VALUE with KEY in {', '.join(sorted(known))}, "
                                 f"got {part!r}")
            try:
                value = float(raw)
            except ValueError:
                raise InputError(f"--thresholds: {key} must be a number, got {raw.strip()!r}") from None
            if not math.isfinite(value) or value < 0:
                raise InputError(f"--thresholds: {key} must be a finite number >= 0, got {raw.strip()!r}")
            if key == "ops_must_conform" and value not in (0.0, 1.0):
                raise InputError(f"--thresholds: ops_must_conform must be 0 or 1, got {raw.strip()!r}")
            values[key] = value
    return replace(base or Thresholds(), **values)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    failures: tuple[str, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class Check:
    """One compared position as the pass rule sees it."""

    where: str
    top1_match: bool
    near_tie: bool
    detail: str = ""


def verdict(checks: Sequence[Check], rel_err_mean: float, thresholds: Thresholds,
            failed_ops: Sequence[str] = ()) -> Verdict:
    """Apply the pass rule (module docstring). Returns every failure and note as one line each."""
    failures: list[str] = []
    notes: list[str] = []
    for check in checks:
        if check.top1_match:
            continue
        line = f"top-1 mismatch at {check.where}" + (f": {check.detail}" if check.detail else "")
        if check.near_tie:
            notes.append(f"near-tie (margin < {thresholds.near_tie_margin:g}), not a failure: {line}")
        else:
            failures.append(line)
    limit = thresholds.top1_prob_rel_err_mean
    if not rel_err_mean < limit:
        failures.append(f"mean top-1 probability relative error {rel_err_mean:.2%} is not < {limit:.2%}")
    if failed_ops:
        line = "op conformance failed for: " + ", ".join(failed_ops)
        (failures if thresholds.ops_must_conform else notes).append(line)
    return Verdict(not failures, tuple(failures), tuple(notes))
