"""PNG plots of a report dict (matplotlib, Agg backend): top-k reference vs device per prompt,
and per-layer drift."""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_topk(report: dict[str, Any], out: Path) -> Path:
    """One panel per prompt: the reference's top-k tokens at the prompt end, reference vs device
    probability of each."""
    plt = _pyplot()
    prompts = report["prompts"]
    cols = min(3, len(prompts))
    rows = math.ceil(len(prompts) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    suffix = " (EMULATED)" if report["emulated"] else ""
    for ax, p in zip(axes.flat, prompts):
        table = p["positions"][0]["top10"]
        xs = list(range(len(table)))
        ax.bar([x - 0.2 for x in xs], [t["ref_prob"] for t in table], width=0.4, label="reference fp32")
        ax.bar([x + 0.2 for x in xs], [t["dev_prob_of_ref_token"] for t in table], width=0.4,
               label=f"{report['device']}{suffix} {report['dtype']}")
        ax.set_xticks(xs, [repr(t["ref_token"])[:10] for t in table], rotation=60, fontsize=7)
        ax.set_title(p["prompt"][:40], fontsize=9)
        ax.set_ylabel("probability", fontsize=8)
    for ax in list(axes.flat)[len(prompts):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(report["title"], fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.12, top=0.90, hspace=0.75, wspace=0.25)
    path = out / "top10.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs for exotic tokens
        fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_drift(report: dict[str, Any], out: Path) -> Path:
    """Mean and max relative L2 drift per hidden state (log scale) with the threshold line."""
    plt = _pyplot()
    drift = report["drift"]
    layers = [x for x in drift["layers"] if x["rel_l2_max"] == x["rel_l2_max"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = [x["index"] for x in layers]
    floor = 1e-12  # log scale: exact zeros drawn at the floor
    ax.plot(xs, [max(x["rel_l2_mean"], floor) for x in layers], marker="o", label="mean over prompts")
    ax.plot(xs, [max(x["rel_l2_max"], floor) for x in layers], marker="s", label="max over prompts")
    ax.axhline(drift["threshold"], color="red", linestyle="--", label=f"threshold {drift['threshold']:.0e}")
    ax.set_yscale("log")
    ax.set_xticks(xs, [x["name"] for x in layers], rotation=45, fontsize=7)
    ax.set_ylabel("relative L2 vs reference")
    title = "Per-layer drift"
    if drift["first_layer_over"]:
        title += f" (first over threshold: {drift['first_layer_over']})"
    ax.set_title(f"{title}\n{report['title']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.22, top=0.86)
    path = out / "drift.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
