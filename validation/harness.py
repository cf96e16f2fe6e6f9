"""Drive the device under test and the reference over the prompts; build the report dict.

The report dict *is* report.json (schema in ``validation/README.md``); the Markdown and the
plots are rendered from it, so every number a user reads is one a machine can read too.
"""
from __future__ import annotations

import datetime as _dt
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import hal
from hal.api import dtype_name, parse_dtype
from hal.errors import InputError
from hal.ops import get_spec
from model.gguf_checkpoint import parsed_once
from validation import quantization
from validation.opcheck import case
from validation import environment, faults, floor, grid, metrics, opcheck
from validation.drift import layer_drift, summarize_drift
from validation.passrule import FLOOR_RULES, TIE_FACTOR, Check, Thresholds, seed_rule, tie_margin, verdict

from hal import probing as hal_devices

SCHEMA = "minicpm-hal/validation-report"
SCHEMA_VERSION = 2

Progress = Callable[[str], None]

FLOOR_KEYS = ("kl_mean", "kl_max", "top1_prob_rel_err_mean", "top1_mismatch_rate", "top1_match_rate",
              "top10_prob_mae")
"""The summary keys each floor implementation reports (report.json ``floor[]``)."""


@dataclass
class Settings:
    """Everything a comparison depends on (the CLI fills it; tests build it directly).

    op_overrides: op -> callable for the device model (fault injection). fault: the name of a
    ``validation/faults.py`` fault to inject into the device model (developer option).
    decode_graph: the device replays its decode steps from a device graph (cuda, npu); drift then
    covers the prompt positions (a replay returns logits only)."""

    model: Path
    device: str = "auto"
    dtype: str = "bfloat16"
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    top_k: int = 10
    positions: int = 4
    thresholds: Thresholds = field(default_factory=Thresholds)
    allow_fallback: bool = False
    reference: str = "cpu-fp32"
    trust_remote_code: bool = False
    op_overrides: dict[str, Callable[..., Any]] | None = None
    fault: str | None = None
    decode_graph: bool = False
    quantize: str | None = None  # hal.load_model's quantize, for the device and our reference
    tp: int = 1
    """Tensor-parallel ranks of the device under test (every rank runs the whole comparison; the
    reference and the floors are single-process on each rank, so the ranks agree bit for bit)."""


class OurReference:
    """Our float32 CPU model as the judge: the naive reference ops (``cpu-fp32``), or for long
    prompts on big models the float32 torch ops (``cpu-fp32-torch``: themselves checked against
    the naive ops on the grid, and on this model's shapes by the report's conformance step)."""

    def __init__(self, model: Any, name: str = "cpu-fp32"):
        self.model = model
        self.name = name
        self.bound_ops = model.ops.as_dict()

    def run(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """ids `[1, T]` -> (logits `[T, V]` float32, L+1 hidden states `[1, T, E]`)."""
        out = self.model.forward(ids, output_hidden_states=True)
        return out.logits[0].float(), list(out.hidden_states)

    def teacher_force(self, prompt: torch.Tensor, positions: int):
        """The deployment protocol (prefill, then one decode step per greedy token): see
        :func:`validation.floor.teacher_force`."""
        return floor.teacher_force(self.model, prompt, positions)


def teacher_force(reference: Any, prompt: torch.Tensor, positions: int):
    """(ids `[1, P + positions]`, logits `[T, V]`, hidden states) of the reference's greedy
    continuation; a reference without a KV cache (transformers) recomputes the sequence per token."""
    if hasattr(reference, "teacher_force"):
        return reference.teacher_force(prompt, positions)
    ids = prompt
    for _ in range(positions):
        logits, _ = reference.run(ids)
        ids = torch.cat([ids, logits[-1].argmax().view(1, 1)], dim=1)
    logits, hidden = reference.run(ids)
    return ids, logits, hidden


def _silent(_: str) -> None:
    pass


def _token_text(tokenizer: Any, token_id: int) -> str:
    text = tokenizer.decode([token_id])
    if not text.strip() or "\ufffd" in text:  # whitespace or a lone UTF-8 byte: show the piece
        text = str(tokenizer.convert_ids_to_tokens(token_id))
    return text


def _parameter_count(model: Any) -> int:
    """Parameters of the whole model (a tensor-parallel rank holds a slice: counted from the config)."""
    if getattr(model, "tp", None) is not None and model.tp.size > 1:
        import math

        from model.checkpoint import expected_shapes

        return sum(math.prod(shape) for shape in expected_shapes(model.config).values())
    total = model.embed.numel() + model.final_norm.numel()  # a quantized table (model/table.py) has numel()
    if model.lm_head is not model.embed:
        total += model.lm_head.numel()
    for layer in model.layers:
        total += sum(t.numel() for t in vars(layer).values() if isinstance(t, torch.Tensor))
    return total + sum(r["shape"][0] * r["shape"][1] for r in quantization.describe(model)["linears"])


QUANTIZED_OPS = ("linear_int4", "linear_int8", "linear_ternary")
PREPARED_OPS = (*QUANTIZED_OPS, "logits")
"""Ops whose bound implementation may repack their weight at bind (``BoundOps.prepare``): the
model's conformance cases go through that prepare too."""


def dt_cases(dtype: str) -> str:
    return dtype if dtype in get_spec("linear_int4").dtypes else "float32"


def quantized_cases(model: Any, dtype: str, lengths: list[int]) -> list[Any]:
    """One conformance case per (op, source, K, O, group size) of the model's quantized linears,
    at each prompt length (random containers of that format; the bound impl's prepare applies)."""
    seen = {}
    for layer in model.layers:
        for field in quantization.LINEARS:
            value = getattr(layer, field, None)
            if value is None or isinstance(value, torch.Tensor):
                continue
            source, _, group = value.format.split()
            seen[(value.op, source, value.shape[1], value.shape[0], int(group[1:]))] = None
    return [case(op, dtype, (source,), B=1, T=t, K=k, O=o, G=g)
            for (op, source, k, o, g) in seen for t in sorted(set(lengths))]


def _tensor_parallel(model: Any) -> dict[str, Any]:
    """ranks, and the weight bytes each rank holds (gathered: every rank runs this)."""
    from model.tp import weight_bytes

    mine = torch.tensor([weight_bytes(model)], dtype=torch.int64, device=model.tp.group.device)
    return {"ranks": model.tp.size, "rank_weight_bytes": model.tp.group.all_gather(mine, dim=0).tolist()}


def run_fields(kind: str, description: str, emulated: bool, dtype: str, reference: str) -> dict[str, Any]:
    """The fields every report (prompts and corpus mode) records about its run."""
    return {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": kind,
            "device_description": description + (" (EMULATED: numbers from the torch_npu emulator, "
                                                  "not hardware)" if emulated else ""),
            "dtype": dtype, "reference": reference}


def is_emulated(kind: str) -> bool:
    """True when the chosen device is the NPU emulator (its probe description says so)."""
    return kind == "npu" and "emulat" in hal_devices.probe("npu").description.lower()


def _top_table(p_ref: torch.Tensor, p_dev: torch.Tensor, k: int,
               tok: Callable[[int], str]) -> list[dict[str, Any]]:
    """The reference's and the device's own top-k, rank by rank (p_ref/p_dev: `[V]`)."""
    ref_vals, ref_ids = torch.topk(p_ref, k)
    dev_vals, dev_ids = torch.topk(p_dev, k)
    return [{"rank": r + 1,
             "ref_id": int(ref_ids[r]), "ref_token": tok(int(ref_ids[r])), "ref_prob": float(ref_vals[r]),
             "dev_id": int(dev_ids[r]), "dev_token": tok(int(dev_ids[r])), "dev_prob": float(dev_vals[r]),
             "dev_prob_of_ref_token": float(p_dev[ref_ids[r]])} for r in range(k)]


def _load_reference(settings: Settings, progress: Progress) -> Any:
    if settings.reference == "hf":
        from validation.hf_reference import HFReference, check_remote_code

        check_remote_code(Path(settings.model), settings.trust_remote_code)
        progress(f"loading the transformers reference (cpu, float32, remote code) from {settings.model}")
        reference: Any = HFReference(Path(settings.model))
    elif settings.reference in ("cpu-fp32", "cpu-fp32-torch"):
        naive = settings.reference == "cpu-fp32"
        progress(f"loading the reference (cpu, float32, {'reference' if naive else 'torch'} ops) from {settings.model}")
        reference = OurReference(hal.load_model(settings.model, "cpu", "float32", reference=naive,
                                                quantize=settings.quantize),
                                 settings.reference)
    else:
        raise InputError(f"unknown reference {settings.reference!r}; choose cpu-fp32, cpu-fp32-torch or hf")
    return reference


def _load(settings: Settings, progress: Progress, reuse: dict[Any, Any] | None) -> tuple[Any, Any, str]:
    kind = hal_devices.resolve(settings.device)
    dtype = dtype_name(parse_dtype(settings.dtype))
    started = time.perf_counter()
    reuse = {} if reuse is None else reuse
    key = ("reference", str(settings.model), settings.reference, settings.quantize)
    if key not in reuse:
        reuse[key] = _load_reference(settings, progress)
        progress(f"reference loaded in {time.perf_counter() - started:.1f} s")
    reference = reuse[key]
    device_started = time.perf_counter()
    fault = faults.get(settings.fault) if settings.fault else None
    overrides = {**(settings.op_overrides or {}), **(fault.overrides() if fault else {})} or None
    progress(f"loading the device under test ({kind}, {dtype})" + (f", fault {fault.name} injected" if fault else "")
             + (f", tensor parallel over {settings.tp} ranks" if settings.tp > 1 else ""))
    device_model = hal.load_model(settings.model, kind, dtype, allow_fallback=settings.allow_fallback,
                                  op_overrides=overrides, quantize=settings.quantize, tp=settings.tp)
    if fault is not None:
        fault.install(device_model)
    progress(f"device model loaded in {time.perf_counter() - device_started:.1f} s "
             f"(models: {time.perf_counter() - started:.1f} s)")
    return reference, device_model, kind


def run(settings: Settings, progress: Progress = _silent, reuse: dict[Any, Any] | None = None) -> dict[str, Any]:
    """Compare the device under test with the reference; return the report dict (report.json).

    reuse: a dict kept between calls (calibration runs many cases on one model): the reference
    and the floor implementations are loaded once per model and dtype and kept there.

    Raises HalError subclasses for user errors (bad model, device unavailable, bad prompt)."""
    if settings.top_k < 5:
        raise InputError(f"--top-k must be >= 5 (top-5 inclusion is reported), got {settings.top_k}")
    if settings.positions < 0:
        raise InputError(f"--positions must be >= 0, got {settings.positions}")
    if not settings.prompts:
        raise InputError("no prompts to compare")
    for key, value in settings.thresholds.as_dict().items():  # the CLI's parse_overrides checks the same
        usable = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
        if value is not None and not usable:
            raise InputError(f"threshold {key} must be a finite number >= 0, got {value!r}")
    t0 = time.perf_counter()
    reuse = {} if reuse is None else reuse
    with parsed_once(reuse.setdefault("parsed_gguf", {})):  # a GGUF file is parsed once for all its models
        return _run(settings, progress, reuse, t0)


def _run(settings: Settings, progress: Progress, reuse: dict[Any, Any], t0: float) -> dict[str, Any]:
    reference, model, kind = _load(settings, progress, reuse)
    dtype = dtype_name(model.dtype)
    key = ("floors", str(settings.model), settings.reference, settings.quantize, dtype, kind == "cpu")
    if key not in reuse:
        judge = reference.model if isinstance(reference, OurReference) else \
            hal.load_model(settings.model, "cpu", "float32", reference=True, quantize=settings.quantize)
        reuse[key] = floor.build(judge, settings.model, kind, dtype, settings.allow_fallback, progress,
                                 quantize=settings.quantize)
    floors = reuse[key]
    judge_is_reference = isinstance(reference, OurReference)  # the floors' judge is reference.model
    t_load = time.perf_counter() - t0
    thresholds = settings.thresholds.for_dtype(dtype)
    tokenizer = model.tokenizer
    k = min(settings.top_k, model.config.vocab_size)
    tok = lambda i: _token_text(tokenizer, i)  # noqa: E731

    prompts_out: list[dict[str, Any]] = []
    rows: list[metrics.PositionMetrics] = []
    labels: list[str] = []
    end_rows: list[metrics.PositionMetrics] = []
    end_labels: list[str] = []
    floor_rows: dict[str, list[metrics.PositionMetrics]] = {f.name: [] for f in floors}
    compared: list[tuple[str, metrics.PositionMetrics, str]] = []
    drifts: list[list[float]] = []
    lengths: list[int] = []
    graph_mode = None
    t1 = time.perf_counter()
    for index, prompt in enumerate(settings.prompts):
        prompt_ids = torch.tensor([tokenizer(prompt)["input_ids"]], dtype=torch.long)
        if prompt_ids.shape[1] == 0:
            raise InputError(f"prompt {index + 1} ({prompt!r}) encodes to no tokens")
        try:
            model.check_input_ids(prompt_ids, extra=settings.positions)
        except InputError as exc:
            raise InputError(f"prompt {index + 1} ({prompt[:40]!r}): {exc}") from None
        length = prompt_ids.shape[1]
        ids, ref_logits, ref_hidden = teacher_force(reference, prompt_ids, settings.positions)
        if settings.decode_graph:
            dev_logits, dev_hidden, graph_mode = floor.run_graph(model, ids, length)
            ref_hidden = [h[:, :length] for h in ref_hidden]
        else:
            dev_logits, dev_hidden = floor.run_cached(model, ids, length)
        # a floor that is the judge itself gives the judge's logits bit for bit: not run again
        floor_logits = {f.name: ref_logits if f.same_as_judge and judge_is_reference
                        else floor.run_cached(f.model, ids, length)[0] for f in floors}
        lengths += [length, ids.shape[1]]
        drift = layer_drift(ref_hidden, dev_hidden)
        drifts.append(drift)
        positions = []
        for offset in range(settings.positions + 1):
            pos = length - 1 + offset
            p_ref = metrics.softmax64(ref_logits[pos])
            p_dev = metrics.softmax64(dev_logits[pos])
            m = metrics.position_metrics(p_ref, p_dev, k, thresholds.near_tie_margin)
            for name, logits in floor_logits.items():
                floor_rows[name].append(metrics.position_metrics(p_ref, metrics.softmax64(logits[pos]), k,
                                                                 thresholds.near_tie_margin))
            label = prompt if offset == 0 else f"{prompt} [+{offset}]"
            rows.append(m)
            labels.append(label)
            if offset == 0:
                end_rows.append(m)
                end_labels.append(label)
            detail = (f"reference {tok(m.ref_top1)!r} ({m.ref_top1_prob:.4f}) vs device {tok(m.dev_top1)!r} "
                      f"({float(p_dev[m.dev_top1]):.4f})")
            compared.append((f"prompt {index + 1} position {pos}" + (f" (+{offset})" if offset else ""), m, detail))
            positions.append({
                "offset": offset, "position": pos, "teacher_forced": offset > 0,
                "ref_top1": {"id": m.ref_top1, "token": tok(m.ref_top1), "prob": m.ref_top1_prob},
                "dev_top1": {"id": m.dev_top1, "token": tok(m.dev_top1), "prob": float(p_dev[m.dev_top1])},
                "dev_prob_of_ref_top1": m.dev_prob_of_ref_top1, "top1_match": m.top1_match,
                "near_tie": m.near_tie, "top1_prob_rel_err": m.top1_prob_rel_err,
                "top5_inclusion": m.top5_inclusion, "top10_overlap": m.topk_overlap, "kl": m.kl,
                "top10": _top_table(p_ref, p_dev, k, tok),
            })
        first = positions[0]
        ref1, dev1 = first["ref_top1"], first["dev_top1"]
        progress(f"prompt {index + 1}/{len(settings.prompts)} {prompt!r}: "
                 f"reference {ref1['token']!r} {ref1['prob']:.4f}, "
                 f"device {dev1['token']!r} {dev1['prob']:.4f}, rel err {first['top1_prob_rel_err']:.2%}, "
                 f"max layer drift {max((d for d in drift if d == d), default=float('nan')):.2e}")
        prompts_out.append({"index": index + 1, "prompt": prompt, "tokens": length,
                            "continuation": tokenizer.decode(ids[0, length:].tolist()),
                            "positions": positions, "layer_drift": drift})
    t_prompts = time.perf_counter() - t1

    t2 = time.perf_counter()
    sparse = model.config.sparse.geometry if model.config.sparse is not None else None
    lightning = model.config.lightning.heads if model.config.lightning is not None else 0
    cases = grid.model_cases(model.config.shapes(), dtype, lengths, max(lengths), sparse, lightning)
    cases += quantized_cases(model, dt_cases(dtype), lengths)
    progress(f"op conformance on this model's shapes: {len(cases)} cases")
    results = [opcheck.check(c, getattr(model.ops, c.op), model.ops.record[c.op].impl, kind,
                             prepare=(lambda w, ctx, op=c.op: model.ops.prepare(op, w)) if c.op in PREPARED_OPS
                             else None) for c in cases]
    failed_ops = sorted({r.case.op for r in results if not r.passed})
    t_conf = time.perf_counter() - t2
    progress(f"op conformance: {sum(r.passed for r in results)}/{len(results)} cases passed in {t_conf:.1f} s"
             + (f" (failed: {', '.join(failed_ops)})" if failed_ops else ""))

    swing = max((r.top2_swing for floor_list in floor_rows.values() for r in floor_list), default=0.0)
    margin = tie_margin(thresholds.near_tie_margin, swing)
    summary = metrics.summarize(rows, labels, k)
    summary["top1_mismatch_rate"] = metrics.mismatch_rate(rows, margin)
    floor_summaries = {name: {**metrics.summarize(r, labels, k), "top1_mismatch_rate": metrics.mismatch_rate(r, margin)}
                       for name, r in floor_rows.items()}
    checks = [Check(where, m.top1_match, m.ref_margin < margin, detail) for where, m, detail in compared]
    seed_checks = [Check(where, m.top1_match, m.near_tie, detail) for where, m, detail in compared]
    judged = verdict(summary, floor_summaries, thresholds, checks, failed_ops, tie=margin)
    drift_summary = summarize_drift(drifts, float(thresholds.drift_rel_l2 or 0.0))
    emulated = is_emulated(kind)
    description = hal_devices.probe(kind).description
    title = (f"Accuracy report: {kind}{' (EMULATED)' if emulated else ''} {dtype} vs "
             f"{'transformers' if reference.name == 'hf' else 'CPU'} float32 reference"
             f"{' (torch ops)' if reference.name == 'cpu-fp32-torch' else ''}")
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "title": title,
        "emulated": emulated,
        "passed": judged.passed,
        "verdict": {"passed": judged.passed, "failures": list(judged.failures), "notes": list(judged.notes),
                    "metrics": [m.as_dict() for m in judged.metrics],
                    "tie_margin": margin, "floor_top2_swing_max": swing, "tie_factor": TIE_FACTOR,
                    "rules": [{"metric": r.metric, "label": r.label, "factor": thresholds.factor(r),
                               "minimum": r.minimum, "rationale": r.rationale} for r in FLOOR_RULES]},
        "seed_rule": seed_rule(seed_checks, float(summary["top1_prob_rel_err_mean"]), thresholds),
        "floor": [{"name": f.name, "description": f.description,
                   **{key: floor_summaries[f.name][key] for key in FLOOR_KEYS}} for f in floors],
        "fault": settings.fault,
        **run_fields(kind, description, emulated, dtype, reference.name),
        "settings": {"top_k": k, "positions": settings.positions, "prompts_file": settings.prompts_file,
                     "allow_fallback": settings.allow_fallback, "thresholds": thresholds.as_dict(),
                     "decode_graph": graph_mode, "tensor_parallel": _tensor_parallel(model)},
        **{key: value for key, value in summary.items()},
        "prompt_end": {**metrics.summarize(end_rows, end_labels, k),
                       "top1_mismatch_rate": metrics.mismatch_rate(end_rows, margin)},
        "prompts": prompts_out,
        "drift": drift_summary.as_dict(),
        "conformance": {"cases": [r.as_dict() for r in results], "failed_ops": failed_ops,
                        "passed": sum(r.passed for r in results), "total": len(results)},
        "bound_ops": model.ops.as_dict(),
        "quantization": quantization.describe(model),
        "fallback_ops": sorted(op for op, b in model.ops.record.items() if b.fallback),
        "reference_bound_ops": reference.bound_ops,
        "model": {"path": str(settings.model), "synthetic": (Path(settings.model) / "SYNTHETIC.md").is_file(),
                  "architecture": (model.config.raw.get("architectures") or ["?"])[0],
                  "parameters": _parameter_count(model), "weights_dtype": model.config.torch_dtype,
                  "config": model.config.raw},
        "environment": environment.collect(description),
        "timing_s": {"load": round(t_load, 3), "prompts": round(t_prompts, 3),
                     "conformance": round(t_conf, 3)},
    }
    return report
