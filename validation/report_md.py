"""report.md: the seed-004 tables (environment, model configuration, per-prompt accuracy,
summary, top-10 distribution per prompt) plus drift, op conformance and a verdict, rendered
from the report dict."""
from __future__ import annotations

from typing import Any

from validation import quantization

OK, BAD, TIE = "✅", "❌", "≈"


def _pct(value: float) -> str:
    """A fraction as a percentage; values too small for two decimals keep their magnitude."""
    if 0 < value < 5e-5:
        return f"{value * 100:.1e}%"
    return f"{value:.2%}"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", "\\n")

    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] + [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def _mark(pos: dict[str, Any]) -> str:
    if pos["top1_match"]:
        return OK
    return TIE + " near-tie" if pos["near_tie"] else BAD


def _environment(r: dict[str, Any]) -> list[str]:
    env = r["environment"]
    rows = [["Device under test", f"{r['device']}: {r['device_description']}"],
            ["Reference", "transformers (remote code), CPU float32" if r["reference"] == "hf"
             else "minicpm-hal reference ops, CPU float32"]]
    names = {"os": "OS", "machine": "CPU architecture", "cpu_count": "CPU cores",
             "memory_gib": "System memory (GiB)", "python": "Python", "torch": "PyTorch",
             "torch_threads": "PyTorch CPU threads", "torch_npu": "torch_npu", "triton": "Triton",
             "transformers": "transformers", "cuda_runtime": "CUDA runtime", "cann": "CANN",
             "driver": "Driver"}
    rows += [[label, env.get(key) if env.get(key) is not None else "-"] for key, label in names.items()]
    return _table(["Item", "Value"], rows)


def _model(r: dict[str, Any]) -> list[str]:
    cfg = r["model"]["config"]
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
    rope = cfg.get("rope_scaling") or {}
    rows = [
        ["Architecture", r["model"]["architecture"], ""],
        ["Parameters", f"{r['model']['parameters'] / 1e6:.1f}M", ""],
        ["hidden_size", cfg.get("hidden_size"), ""],
        ["num_hidden_layers", cfg.get("num_hidden_layers"), ""],
        ["num_attention_heads", heads, ""],
        ["num_key_value_heads", kv, f"GQA {heads // kv}:1" if heads and kv else ""],
        ["intermediate_size", cfg.get("intermediate_size"), ""],
        ["max_position_embeddings", cfg.get("max_position_embeddings"),
         f"{rope.get('rope_type', rope.get('type'))} scaling" if rope else ""],
        ["vocab_size", cfg.get("vocab_size"), ""],
        ["torch_dtype (weights)", r["model"]["weights_dtype"], ""],
        ["Checkpoint", r["model"]["path"], "synthetic (random weights)" if r["model"]["synthetic"] else ""],
    ]
    return _table(["Parameter", "Value", "Note"], rows)


def _per_prompt(r: dict[str, Any]) -> list[str]:
    k = r["settings"]["top_k"]
    rows = []
    for p in r["prompts"]:
        pos = p["positions"][0]
        rows.append([p["prompt"], repr(pos["ref_top1"]["token"]), f"{pos['ref_top1']['prob']:.4f}",
                     repr(pos["dev_top1"]["token"]), f"{pos['dev_top1']['prob']:.4f}",
                     _pct(pos["top1_prob_rel_err"]), f"{pos['kl']:.2e}",
                     f"{pos['top10_overlap']}/{k} {_mark(pos)}"])
    return _table(["Prompt", "Ref top-1", "Ref prob", "Device top-1", "Device prob", "Top-1 prob rel err",
                   "KL", f"Top-{k} overlap"], rows)


def _positions(r: dict[str, Any]) -> list[str]:
    rows = []
    for p in r["prompts"]:
        forced = p["positions"][1:]
        if not forced:
            continue
        matches = sum(x["top1_match"] for x in forced)
        ties = sum(x["near_tie"] and not x["top1_match"] for x in forced)
        rel = [x["top1_prob_rel_err"] for x in forced]
        matched = f"{matches}/{len(forced)}" + (f" ({ties} near-tie)" if ties else "")
        rows.append([p["prompt"], repr(p["continuation"]), matched, _pct(sum(rel) / len(rel)), _pct(max(rel)),
                     f"{max(x['kl'] for x in forced):.2e}"])
    if not rows:
        return []
    return ["## Teacher-forced positions", "",
            f"After each prompt, the reference's {r['settings']['positions']} greedy tokens are appended and "
            "every position's next-token distribution is compared.", ""] + _table(
        ["Prompt", "Reference continuation", "Top-1 match", "Mean rel err", "Max rel err", "Max KL"],
        rows) + [""]


def _summary(r: dict[str, Any]) -> list[str]:
    k = r["settings"]["top_k"]
    end = r["prompt_end"]
    limit = r["settings"]["thresholds"]["top1_prob_rel_err_mean"]

    def both(key: str, fmt: Any) -> list[str]:
        return [fmt(r[key]), fmt(end[key])]

    def rate(v: float) -> str:
        return f"{v:.0%}"

    rows = [
        ["Top-1 token match rate", *both("top1_match_rate", rate)],
        ["Top-5 inclusion rate (reference top-1 in device top-5)", *both("top5_inclusion_rate", rate)],
        [f"Top-{k} overlap (mean of {k})", *both("top10_overlap_mean", lambda v: f"{v:.2f}/{k}")],
        [f"Top-1 prob mean relative error (seed rule: < {limit:.0%})", *both("top1_prob_rel_err_mean", _pct)],
        ["Top-1 prob max relative error",
         f"{_pct(r['top1_prob_rel_err_max'])} ({r['top1_prob_rel_err_max_prompt']!r})",
         f"{_pct(end['top1_prob_rel_err_max'])} ({end['top1_prob_rel_err_max_prompt']!r})"],
        [f"Top-{k} prob MAE", *both("top10_prob_mae", lambda v: f"{v:.5f}")],
        [f"Top-{k} prob max abs error", *both("top10_prob_max_abs_err", lambda v: f"{v:.5f}")],
        [f"Top-{k} prob RMSE", *both("top10_prob_rmse", lambda v: f"{v:.5f}")],
        ["KL(ref ‖ device) mean (nats)", *both("kl_mean", lambda v: f"{v:.2e}")],
        ["KL(ref ‖ device) max (nats)", *both("kl_max", lambda v: f"{v:.2e}")],
        ["Near-ties (reference top-1 − top-2 < margin)", *both("near_ties", str)],
        ["Positions compared", *both("positions", str)],
    ]
    return _table(["Metric", "All positions", "Prompt ends only (seed protocol)"], rows)


def _drift(r: dict[str, Any]) -> list[str]:
    d = r["drift"]
    def num(value: float | None) -> str:
        if value is None or value != value:
            return "n/a"
        return "non-finite" if value == float("inf") else f"{value:.2e}"

    rows = [[layer["name"], num(layer["rel_l2_mean"]), num(layer["rel_l2_max"]),
             BAD if layer["name"] == d["first_layer_over"] else ""] for layer in d["layers"]]
    first = d["first_layer_over"]
    line = (f"First layer past {d['threshold']:.0e}: **{first}**." if first
            else f"No layer passes the drift threshold {d['threshold']:.0e}.")
    if d.get("first_layer_non_finite"):
        line += f" First hidden state holding NaN/Inf: **{d['first_layer_non_finite']}**."
    return ["## Per-layer hidden-state drift", "",
            "Relative L2 of the residual stream after the embedding and after each layer, "
            "device vs reference.",
            "", *_table(["Hidden state", "Mean rel L2", "Max rel L2", ""], rows), "", line, ""]


def _conformance(r: dict[str, Any]) -> list[str]:
    c = r["conformance"]
    lines = ["## Op conformance (this model's shapes)", "",
             f"{c['passed']}/{c['total']} cases within the catalogue NMSE tolerance."]
    bad = [x for x in c["cases"] if x["status"] not in ("ok", "not supported")]
    if bad:
        lines += ["", *_table(["Case", "Implementation", "Status", "NMSE", "Tolerance", "Output / reason"],
                              [[x["case"], x["impl"], x["status"], f"{x['nmse']:.2e}",
                                f"{x['tolerance']:.0e}", x["output"] or x["reason"]] for x in bad])]
    return lines + [""]


def _bound_ops(r: dict[str, Any]) -> list[str]:
    rows = [[op, b["impl"], "CPU fallback" if b["fallback"] else ""] for op, b in r["bound_ops"].items()]
    head = quantization.head_lines(r.get("quantization", {}).get("lm_head"))
    return ["## Bound ops", "", *_table(["Op", "Implementation", "Note"], rows), "", *head, *([""] if head else [])]


def _distributions(r: dict[str, Any]) -> list[str]:
    lines = [f"## Top-{r['settings']['top_k']} distribution per prompt (reference vs device)", ""]
    for p in r["prompts"]:
        lines += [f"Prompt: {p['prompt']!r}", "```",
                  f"{'Rank':<4} | {'Ref token':<14} | {'Ref prob':>8} | {'Dev token':<14} | "
                  f"{'Dev prob':>8} | Match",
                  "-----|----------------|----------|----------------|----------|------"]
        for row in p["positions"][0]["top10"]:
            same = OK if row["ref_id"] == row["dev_id"] else ""
            lines.append(f"{row['rank']:<4} | {repr(row['ref_token']):<14} | {row['ref_prob']:8.6f} | "
                         f"{repr(row['dev_token']):<14} | {row['dev_prob']:8.6f} | {same}")
        lines += ["```", ""]
    return lines


def _num(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.3g}"


def _verdict(r: dict[str, Any]) -> list[str]:
    v = r["verdict"]
    s = r["settings"]["thresholds"]
    device = f"{r['device']}{' (EMULATED)' if r['emulated'] else ''}"
    head = (f"**{'PASS' if v['passed'] else 'FAIL'}**: {device} {r['dtype']} is "
            f"{'' if v['passed'] else 'not '}as accurate as {r['dtype']} allows on this model "
            f"(noise floor measured in this run, {r['positions']} positions)"
            + (f"; fault injected: `{r['fault']}`" if r.get("fault") else "") + ".")
    rows = [[m["label"], _num(m["floor"]), m["floor_source"], _num(m["device"]), _num(m["ratio"]),
             f"≤ {_num(m['limit'])} ({_num(m['factor'])} × floor)", OK if m["passed"] else BAD]
            for m in v["metrics"]]
    lines = [head, "",
             *_table(["Metric", "Floor", "Floor from", "Device", "Ratio", "Limit", "Verdict"], rows), "",
             "Pass rule: every metric ≤ factor × max(floor, minimum); the floor is the largest value over the "
             "floor implementations below, never the device's own output. A top-1 swap counts when the "
             f"reference's top-1 − top-2 margin is at least {_num(v['tie_margin'])} = max(near_tie_margin "
             f"{s['near_tie_margin']:g}, {_num(v['tie_factor'])} × the floor's largest top-2 swing "
             f"{_num(v['floor_top2_swing_max'])}).", ""]
    floor_rows = [[f["name"], f["description"], _num(f["kl_mean"]), _pct(f["top1_prob_rel_err_mean"]),
                   _pct(f["top1_mismatch_rate"])] for f in r["floor"]]
    lines += _table(["Floor implementation", "What", "KL mean", "Top-1 prob rel err", "Top-1 mismatch"],
                    floor_rows) + [""]
    lines += [f"- {BAD} {line}" for line in v["failures"]]
    lines += [f"- {line}" for line in v["notes"]]
    if r["drift"]["first_layer_over"]:
        lines.append(f"- drift: the first hidden state past {r['drift']['threshold']:.0e} is "
                     f"{r['drift']['first_layer_over']}")
    if r["drift"].get("first_layer_non_finite"):
        broken = r["drift"]["first_layer_non_finite"]
        lines.append(f"- {BAD} the first hidden state holding NaN/Inf is {broken}")
    if r["fallback_ops"]:
        lines.append("- ops on the CPU fallback: " + ", ".join(r["fallback_ops"]))
    seed = r["seed_rule"]
    lines += ["", f"Seed 004's rule (informational, not the verdict): {seed['rule']}. This run: mean top-1 "
              f"prob rel err {_pct(seed['top1_prob_rel_err_mean'])}, "
              f"{seed['top1_mismatches_outside_near_ties']} top-1 mismatch(es) outside near-ties: "
              f"{'would pass' if seed['passed'] else 'would fail'} the seed's rule."]
    return lines


def render(r: dict[str, Any]) -> str:
    """The whole report.md text."""
    lines = [f"# {r['title']}", ""]
    if r["emulated"]:
        lines += ["> **EMULATED**: the NPU numbers below come from the torch_npu emulator on this machine, "
                  "not from Ascend hardware.", ""]
    graph = r.get("settings", {}).get("decode_graph")
    if graph:
        lines += [f"> Decode steps replayed from a device graph: {graph}. Drift covers the prompt "
                  "positions (a replay returns logits only).", ""]
    lines += ["## Verdict", "", *_verdict(r), "",
              "## Environment", "", *_environment(r), "",
              "## Model configuration", "", *_model(r), "",
              *_bound_ops(r),
              *quantization.markdown(r.get("quantization", {})),
              "## Accuracy per prompt (next token after the prompt)", "", *_per_prompt(r), "",
              *_positions(r),
              "## Summary", "", *_summary(r), "",
              *_drift(r), *_conformance(r), *_distributions(r)]
    return "\n".join(lines).rstrip() + "\n"
