"""Markdown of a ``benchmarks.run`` result (the JSON document): seed 004's tables, one row per
case and engine, with ours ÷ baseline ratios (> 1: ours is better) beside each baseline."""
from __future__ import annotations

from typing import Any, Callable

GIB = 2 ** 30


def _num(fmt: str) -> Callable[[Any], str]:
    return lambda v: format(v, fmt)


def _gib(v: Any) -> str:
    return f"{v / GIB:.3f} GiB"


# table -> (title, case column, [(metric, column, formatter)], ratio metrics)
LAYOUT: dict[str, tuple[str, str, list[tuple[str, str, Callable[[Any], str]]], list[str]]] = {
    "throughput": ("Throughput (batch {batch})", "max_tokens",
                   [("seconds", "total s", _num(".2f")), ("input_tok_s", "input tok/s", _num(".1f")),
                    ("output_tok_s", "output tok/s", _num(".1f"))], ["output_tok_s"]),
    "single": ("Single request ({single_prompt} input tokens)", "max_tokens",
               [("seconds", "total s", _num(".2f")), ("output_tok_s", "output tok/s", _num(".1f")),
                ("first_token_ms", "first token ms", _num(".1f"))], ["output_tok_s"]),
    "long": ("Long context", "context",
             [("prompt_tokens", "prompt tokens", _num("d")), ("prefill_tok_s", "prefill tok/s", _num(".1f")),
              ("decode_ms_per_token", "decode ms/token", _num(".2f"))], ["prefill_tok_s", "decode_ms_per_token"]),
    "memory": ("Memory and start-up", "",
               [("load_s", "load s", _num(".2f")), ("init_s", "init s (load + first generate)", _num(".2f")),
                ("weight_bytes", "weights", _gib), ("kv_bytes_per_token", "KV bytes/token", _num("d")),
                ("kv_capacity_tokens", "KV capacity (tokens, free memory now)", _num("d")),
                ("max_concurrency_1024", "max concurrency (1024 tokens/req)", _num("d")),
                ("peak_bytes", "peak", _gib)], ["weight_bytes", "load_s"]),
    "ops": ("Bound ops on the model's shapes (median)", "op",
            [("shape", "case", str), ("impl", "impl", str), ("ms", "ms", _num(".3f"))], ["ms"]),
}
ENGINE_LABELS = {"ours": "ours (minicpm-hal)", "transformers-sdpa": "transformers sdpa",
                 "transformers-eager": "transformers eager", "llama.cpp": "llama.cpp", "torch-sdpa": "torch SDPA"}


def _ratio_text(ratios: dict[str, Any], table: str, case: str, engine: str, metric: str) -> str:
    entry = ratios.get(f"{table}/{case}/{metric}/{engine}")
    if entry is None:
        return ""
    return "zero" if entry["value"] is None else f"{entry['value']:.2f}x"


def table_markdown(result: dict[str, Any], table: str) -> list[str]:
    title, case_col, columns, ratio_metrics = LAYOUT[table]
    rows = [r for r in result["rows"] if r["table"] == table]
    if not rows:
        return []
    plan = result["plan"]
    present = [c for c in columns if any(c[0] in r.get("metrics", {}) for r in rows)]
    header = ([case_col] if case_col else []) + ["engine"] + [c[1] for c in present]
    header += [f"ours vs this ({dict((c[0], c[1]) for c in columns)[m]})" for m in ratio_metrics
               if any(m in r.get("metrics", {}) for r in rows)]
    shown_ratios = [m for m in ratio_metrics if any(m in r.get("metrics", {}) for r in rows)]
    lines = [f"### {title.format(batch=plan['batch'], single_prompt=plan['single_prompt'])}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = ([r["case"]] if case_col else []) + [ENGINE_LABELS.get(r["engine"], r["engine"])]
        if "skipped" in r:
            cells += [f"skipped: {r['skipped']}"] + [""] * (len(present) - 1 + len(shown_ratios))
        else:
            m = r["metrics"]
            cells += [fmt(m[key]) if key in m else "" for key, _, fmt in present]
            cells += ["" if r["engine"] == "ours" else _ratio_text(result["ratios"], table, r["case"], r["engine"],
                                                                  metric) for metric in shown_ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def greedy_markdown(result: dict[str, Any]) -> list[str]:
    if not result["greedy"]:
        return []
    lines = ["### Greedy tokens: ours against each baseline", "",
             "| table | case | baseline | tokens compared | result |", "|---|---|---|---|---|"]
    for g in result["greedy"]:
        d = g["first_divergence"]
        verdict = "identical" if g["identical"] else \
            f"first divergence: row {d['row']}, new token {d['index']} (ours {d['ours']}, baseline {d['baseline']})"
        lines.append(f"| {g['table']} | {g['case']} | {ENGINE_LABELS.get(g['baseline'], g['baseline'])} "
                     f"| {g['compared']} | {verdict} |")
    return lines + [""]


def environment_markdown(result: dict[str, Any]) -> list[str]:
    env = result["environment"]
    model = result["model"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    emulated = ["- **EMULATED**: the NPU ran on the torch_npu emulator; every time below is a CPU time, "
                "not a hardware number"] if env.get("emulated") else []
    return emulated + [
        f"- **Date:** {env['date']}  **Command:** `{env['command']}`",
        f"- **Device:** {env['device']} ({env['device_name']}), {env['threads']} torch threads, "
        f"{env['cpu_count']} CPUs, {env['memory_gib']} GiB RAM, {env['cpu_model']}",
        f"- **Load average** (1/5/15 min) at start {env['load_average_start']}, at end {env['load_average_end']}",
        f"- **Versions:** {versions}",
        f"- **Model:** {model['name']} ({model['path']}), {model['dtype']}, "
        f"max_position_embeddings {model['max_position_embeddings']}"
        + (", QUICK plan (shortened)" if result["plan"]["quick"] else ""),
    ] + (["- **llama.cpp** runs the GGUF file's own tensor types (quantised); ours and transformers run the "
          f"dequantised weights in {model['dtype']}"
          + ("; its weights stay in plain CPU buffers (use_extra_bufts off: the repacked AMX buffers "
             "crashed on this CPU)" if result.get("llama_cpp_plain_buffers") else "")]
         if any(r["engine"] == "llama.cpp" and "metrics" in r for r in result["rows"]) else []) + [""]


def markdown(result: dict[str, Any]) -> str:
    lines = ["## minicpm-hal benchmark", ""] + environment_markdown(result)
    for table in LAYOUT:
        lines += table_markdown(result, table)
    lines += greedy_markdown(result)
    return "\n".join(lines)
