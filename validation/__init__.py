"""Accuracy validation: any device against the float32 CPU reference.

``python -m validation.compare``      next-token distributions, per-layer drift, op summary, reports
``python -m validation.conformance``  every catalogue op of a backend against the reference
``python -m validation.faults_calibrate``  correct implementations and injected faults vs the verdict

Modules, one job each: ``metrics`` (plain functions on distributions), ``passrule`` (thresholds
and the floor verdict), ``floor`` (the dtype noise floor implementations), ``faults`` (injected
faults), ``drift`` (per-layer hidden-state drift), ``opcheck`` (op cases, NMSE), ``harness``
(drives the models), ``corpus``/``corpus_md`` (corpus mode), ``report_*``/``plots``
(md/json/png), ``prompts``,
``environment``, ``hf_reference``. See ``validation/README.md``.
"""
from __future__ import annotations
