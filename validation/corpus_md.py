"""report.md of corpus mode, rendered from the corpus report dict (validation/corpus.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from validation.report_md import _table


def _g(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.4g}"


def render(r: dict[str, Any]) -> str:
    kl, ppl, dp = r["kl"], r["perplexity"], r["delta_p_ref_top1"]
    lines = [f"# {r['title']}", ""]
    if r["emulated"]:
        lines += ["> **EMULATED**: the NPU numbers below come from the torch_npu emulator on this machine, "
                  "not from Ascend hardware.", ""]
    s = r["settings"]
    lines += [f"Corpus: {r['corpus']['source']} ({r['corpus']['tokens_in_text']} tokens in the text); "
              f"{r['tokens_scored']} positions scored, teacher-forced in {s['windows']} window(s) of at most "
              f"{s['window']} tokens, fed through the KV cache {s['chunk']} tokens at a time."
              + (f" Fault injected: `{r['fault']}`." if r.get("fault") else ""), ""]
    rows = [
        ["Perplexity, reference (float32)", _g(ppl["reference"])],
        [f"Perplexity, device ({r['dtype']})", _g(ppl["device"])],
        ["Perplexity ratio (device / reference)", _g(ppl["ratio"])],
        ["KL(ref ‖ dev) mean (nats)", _g(kl["mean"])],
        ["KL median", _g(kl["median"])],
        ["KL p99", _g(kl["p99"])],
        ["KL p99.9", _g(kl["p99_9"])],
        ["KL max", _g(kl["max"])],
        ["Same top-1 rate", f"{r['same_top1_rate']:.2%}"],
        ["RMS Δp of the reference's top-1 token", f"{dp['rms']:.4%}"],
        ["Mean Δp of the reference's top-1 token", f"{dp['mean']:+.4%}"],
        ["Max |Δp|", f"{dp['max_abs']:.4%}"],
    ]
    lines += ["## Summary", "", *_table(["Metric", "Value"], rows), ""]
    worst = [[w["position"], _g(w["kl"]), repr(w["context"]), repr(w["next_token"]),
              f"{w['ref_top1']['token']!r} {w['ref_top1']['prob']:.4f}",
              f"{w['dev_top1']['token']!r} (p(ref top-1) {w['dev_prob_of_ref_top1']:.4f})"] for w in r["worst"]]
    lines += ["## Worst positions (largest KL)", "",
              *_table(["Position", "KL", "Context (last tokens)", "Next token", "Reference top-1", "Device top-1"],
                      worst), ""]
    t = r["timing_s"]
    lines += [f"Timing: load {t['load']:.1f} s, run {t['run']:.1f} s ({_g(t['tokens_per_s'])} tokens/s, "
              "both models).", ""]
    return "\n".join(lines)


def write(report: dict[str, Any], folder: Path) -> list[str]:
    """report.md and report.json into ``folder``; returns the file names."""
    from validation.compare import _json_safe

    (folder / "report.md").write_text(render(report), encoding="utf-8")
    text = json.dumps(_json_safe(report), indent=2, ensure_ascii=False, allow_nan=False)
    (folder / "report.json").write_text(text + "\n", encoding="utf-8")
    return ["report.md", "report.json"]
