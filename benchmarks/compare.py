"""Regression gate between two ``benchmarks.run`` result documents:

    python -m benchmarks.compare BASE.json NEW.json [--margin 0.2] [--allow-missing]

Compares the tracked ratios (ours over a baseline measured in the same run, > 1: ours better),
never absolute times: a slower machine moves both sides of a ratio. A ratio regresses when
``new < base * (1 - margin)``. Edge cases:

* a tracked ratio of BASE missing from NEW fails (a table or engine vanished) unless
  ``--allow-missing``;
* a ratio only in NEW is listed as new and passes;
* a BASE ratio that is zero or null (a zero measurement) cannot regress: listed, passes;
* a NEW ratio that is null (a zero measurement) fails: it cannot be compared.

Exit codes: 0 no regression, 1 regression (or missing / incomparable), 2 unreadable or
malformed input.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = "minicpm-hal-bench/1"
DEFAULT_MARGIN = 0.2


class BadInput(Exception):
    """A file that is not a benchmark result: the one-line reason."""


def load(path: Path) -> dict[str, dict[str, Any]]:
    """The ``ratios`` of a result document, checked: key -> {"value": float | None, "tracked": bool}."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise BadInput(f"{path}: field 'schema' must be {SCHEMA!r}, got {found!r}")
    ratios = doc.get("ratios")
    if not isinstance(ratios, dict):
        raise BadInput(f"{path}: field 'ratios' must be an object")
    for key, entry in ratios.items():
        if not isinstance(entry, dict) or "value" not in entry:
            raise BadInput(f"{path}: ratios[{key!r}] must be an object with a 'value'")
        value = entry["value"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise BadInput(f"{path}: ratios[{key!r}].value must be a finite number >= 0 or null, got {value!r}")
        if not isinstance(entry.get("tracked", True), bool):
            raise BadInput(f"{path}: ratios[{key!r}].tracked must be true or false")
    return ratios


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


@dataclass
class Line:
    key: str
    base: float | None
    new: float | None
    status: str  # ok, REGRESSION, MISSING, INCOMPARABLE, new, zero baseline
    failed: bool

    def render(self) -> str:
        def fmt(v: float | None) -> str:
            return "—" if v is None else f"{v:.3f}x"

        change = f"{self.new / self.base - 1:+.1%}" if self.base and self.new is not None else ""
        return f"| {self.key} | {fmt(self.base)} | {fmt(self.new)} | {change} | {self.status} |"


def compare(base: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]], margin: float,
            allow_missing: bool = False) -> list[Line]:
    """One line per tracked ratio of either side, BASE's order first."""
    lines = []
    for key, entry in base.items():
        if not entry.get("tracked", True):
            continue
        b = entry["value"]
        if key not in new:
            lines.append(Line(key, b, None, "missing in NEW" + (" (allowed)" if allow_missing else ""),
                              not allow_missing))
            continue
        n = new[key]["value"]
        if not b:
            lines.append(Line(key, b, n, "zero baseline: not compared", False))
        elif n is None:
            lines.append(Line(key, b, n, "INCOMPARABLE: zero measurement in NEW", True))
        elif n < b * (1 - margin):
            lines.append(Line(key, b, n, f"REGRESSION (more than {margin:.0%})", True))
        else:
            lines.append(Line(key, b, n, "ok", False))
    for key, entry in new.items():
        if key not in base and entry.get("tracked", True):
            lines.append(Line(key, None, entry["value"], "new metric", False))
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="the earlier result (BASE.json)")
    p.add_argument("new", type=Path, help="the result under test (NEW.json)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"allowed relative drop of a ratio (default {DEFAULT_MARGIN})")
    p.add_argument("--allow-missing", action="store_true", help="a ratio missing from NEW does not fail")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.margin < 1:
        print(f"error: --margin must be in [0, 1), got {args.margin}", file=sys.stderr)
        return 2
    try:
        base, new = load(args.base), load(args.new)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lines = compare(base, new, args.margin, args.allow_missing)
    print("| ratio (ours / baseline) | base | new | change | status |")
    print("|---|---|---|---|---|")
    for line in lines:
        print(line.render())
    failed = [line for line in lines if line.failed]
    print(f"\nregression gate (margin {args.margin:.0%}): {len(lines) - len(failed)} ratios ok, {len(failed)} failing")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
