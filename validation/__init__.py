"""Accuracy validation: any device against the float32 CPU reference.

``python -m validation.compare``      next-token distributions, per-layer drift, op summary, reports
``python -m validation.conformance``  every catalogue op of a backend against the reference

Modules, one job each: ``metrics`` (plain functions on distributions), ``passrule`` (thresholds
and the verdict), ``drift`` (per-layer hidden-state drift), ``opcheck`` (op cases, NMSE),
``harness`` (drives the two models), ``report_*``/``plots`` (md/json/png), ``prompts``,
``environment``, ``hf_reference``. See ``validation/README.md``.
"""
from __future__ import annotations
