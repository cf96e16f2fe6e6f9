"""What a report says about a model's quantized linears: per linear its checkpoint format
(``hal.quant`` container ``format``, e.g. ``q4_1 int4 g32``), the implementation that prepared it,
the container's bytes and the bytes the model holds after ``prepare``; and the weight bytes of
the whole model (dense tensors + quantized linears)."""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch

LINEARS = ("qkv", "o", "gate_up", "down", "o_gate", "z")
"""``LayerWeights`` fields that may hold a quantized linear (fused names)."""


def _dense_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def describe(model: Any) -> dict[str, Any]:
    """The report's ``quantization`` section: ``linears`` (one row per layer linear), ``groups``
    (rows grouped by linear and format, for the markdown table) and ``weight_bytes``."""
    rows = []
    dense = _dense_bytes(model.embed) + _dense_bytes(model.final_norm)
    if model.lm_head is not model.embed:
        dense += _dense_bytes(model.lm_head)
    for index, layer in enumerate(model.layers):
        for field, value in vars(layer).items():
            if isinstance(value, torch.Tensor):
                dense += _dense_bytes(value)
            elif field in LINEARS and value is not None:
                rows.append({"linear": f"layers.{index}.{field}", "kind": field, "op": value.op, "format": value.format,
                             "impl": value.impl, "shape": list(value.shape), "bytes": value.nbytes, "prepared_bytes": value.prepared_bytes})
    groups: Counter = Counter()
    sizes: dict[tuple[str, str, str], list[int]] = {}
    for r in rows:
        key = (r["kind"], r["format"], r["impl"])
        groups[key] += 1
        acc = sizes.setdefault(key, [0, 0])
        acc[0] += r["bytes"]
        acc[1] += r["prepared_bytes"]
    return {
        "quantized": bool(rows),
        "linears": rows,
        "groups": [{"kind": k, "format": f, "impl": i, "layers": n, "bytes": sizes[(k, f, i)][0],
                    "prepared_bytes": sizes[(k, f, i)][1]} for (k, f, i), n in groups.items()],
        "weight_bytes": {"dense": dense, "quantized": sum(r["bytes"] for r in rows),
                         "quantized_prepared": sum(r["prepared_bytes"] for r in rows)},
    }


def markdown(section: dict[str, Any]) -> list[str]:
    """The report's "Quantized linears" section (empty list for a dense model)."""
    if not section.get("quantized"):
        return []
    lines = ["## Quantized linears", "",
             "Each decoder linear's checkpoint format (the reference decodes the same containers in float32), the "
             "implementation that prepared it on the device, and its bytes (checkpoint container / as held).", "",
             "| Linear | Format | Implementation | Layers | Bytes | Held bytes |", "|---|---|---|---|---|---|"]
    for g in section["groups"]:
        lines.append(f"| {g['kind']} | {g['format']} | {g['impl']} | {g['layers']} | {g['bytes']:,} | "
                     f"{g['prepared_bytes']:,} |")
    w = section["weight_bytes"]
    lines += ["", f"Weights: dense tensors {w['dense']:,} bytes (embedding, norms, lm_head, dense linears) + "
                  f"quantized linears {w['quantized']:,} (held: {w['quantized_prepared']:,}).", ""]
    return lines
