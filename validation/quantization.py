"""What a report says about a model's quantized linears: per linear its checkpoint format
(``hal.quant`` container ``format``, e.g. ``q4_1 int4 g32``), the implementation that prepared it,
the container's bytes and the bytes the model holds after ``prepare``; the token embedding's format
(dense, or a quantized table kept as its codes, ``model/table.py``); the lm_head's prepared form
(``cpu.fbgemm``'s packed float16 copy: extra bytes beside the dense tensor); and the weight bytes of
the whole model (dense tensors + quantized linears + the prepared lm_head)."""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from model.minicpm import LINEAR_NAMES

LINEARS = tuple(LINEAR_NAMES)
"""``LayerWeights`` fields that may hold a quantized linear (fused names)."""


def _dense_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def head(model: Any) -> dict[str, Any] | None:
    """The prepared lm_head (``model.head``, see ``model.minicpm.PreparedHead``): its implementation,
    layout, extra bytes and, where the implementation refused to pack it, why; None when the
    logits op receives the dense tensor."""
    prepared = model.head
    if prepared is None:
        return None
    source = prepared.source
    return {"impl": prepared.impl, "layout": prepared.layout, "prepared_bytes": prepared.prepared_bytes,
            "reason": getattr(prepared.weight, "reason", None),
            "source": "dense tensor" if isinstance(source, torch.Tensor) else f"{source.format} table"}


def embedding(model: Any) -> dict[str, Any]:
    """The token embedding table: its ``format`` (``dense <dtype>``, or the quantized container's,
    e.g. ``q8_0 int8 g32``), the implementation that prepared it (None: dense), its ``bytes`` (held),
    whether the lm_head is the same table (``tied``) and, for a table the checkpoint stores quantized
    that the load decoded, why (``decoded_at_load``)."""
    table = model.embed
    tied = model.lm_head is table
    if isinstance(table, torch.Tensor):
        why = getattr(model, "decoded_at_load", {}).get("model.embed_tokens.weight")
        return {"format": f"dense {str(table.dtype).removeprefix('torch.')}", "impl": None,
                "bytes": _dense_bytes(table), "tied": tied, **({"decoded_at_load": why} if why else {})}
    return {"format": table.format, "impl": table.impl, "bytes": table.prepared_bytes, "tied": tied}


def describe(model: Any) -> dict[str, Any]:
    """The report's ``quantization`` section: ``linears`` (one row per quantized layer linear),
    ``decoded_at_load`` (one row per linear the checkpoint holds quantized that the load decoded to
    dense, with the loader's ``reason``: ``model.decoded_at_load``; its bytes are among the dense), ``groups``
    (rows grouped by linear and format, for the markdown table), ``embedding`` (:func:`embedding`),
    ``lm_head`` (:func:`head`) and ``weight_bytes`` (``embedding``: a quantized table's bytes,
    ``lm_head_prepared``: the prepared lm_head's bytes beside the dense ones)."""
    rows = []
    table = embedding(model)
    quantized_table = table["impl"] is not None
    dense = (0 if quantized_table else table["bytes"]) + _dense_bytes(model.final_norm)
    if not table["tied"]:
        dense += _dense_bytes(model.lm_head)
    decoded = getattr(model, "decoded_at_load", {})
    dense_rows = []
    for index, layer in enumerate(model.layers):
        for field, value in vars(layer).items():
            if isinstance(value, torch.Tensor):
                dense += _dense_bytes(value)
                why = decoded.get(f"model.layers.{index}.{LINEAR_NAMES.get(field)}")
                if why is not None:  # a linear the checkpoint holds quantized, held dense
                    dense_rows.append({"linear": f"layers.{index}.{field}", "kind": field, "reason": why,
                                       "format": f"dense {str(value.dtype).removeprefix('torch.')}",
                                       "impl": model.ops.record["linear"].impl, "bytes": _dense_bytes(value)})
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
    prepared_head = head(model)
    return {
        "quantized": bool(rows) or quantized_table,
        "linears": rows,
        "decoded_at_load": dense_rows,
        "embedding": table,
        "lm_head": prepared_head,
        "groups": [{"kind": k, "format": f, "impl": i, "layers": n, "bytes": sizes[(k, f, i)][0],
                    "prepared_bytes": sizes[(k, f, i)][1]} for (k, f, i), n in groups.items()],
        "weight_bytes": {"dense": dense, "quantized": sum(r["bytes"] for r in rows),
                         "quantized_prepared": sum(r["prepared_bytes"] for r in rows),
                         "embedding": table["bytes"] if quantized_table else 0,
                         "lm_head_prepared": prepared_head["prepared_bytes"] if prepared_head else 0},
    }


def markdown(section: dict[str, Any]) -> list[str]:
    """The report's "Quantized linears" section (empty list for a dense model)."""
    if not section.get("quantized") and not section.get("decoded_at_load") and not section.get("embedding", {}).get("decoded_at_load"):
        return []
    lines = ["## Quantized linears", "",
             "Each decoder linear's checkpoint format (the reference decodes the same containers in float32), the "
             "implementation that prepared it on the device, and its bytes (checkpoint container / as held).", "",
             "| Linear | Format | Implementation | Layers | Bytes | Held bytes |", "|---|---|---|---|---|---|"]
    for g in section["groups"]:
        lines.append(f"| {g['kind']} | {g['format']} | {g['impl']} | {g['layers']} | {g['bytes']:,} | "
                     f"{g['prepared_bytes']:,} |")
    decoded: dict[tuple[str, str, str, str], list[int]] = {}
    for r in section.get("decoded_at_load", []):
        acc = decoded.setdefault((r["kind"], r["format"], r["reason"], r["impl"]), [0, 0])
        acc[0] += 1
        acc[1] += r["bytes"]
    for (kind, fmt, reason, impl), (layers, held) in decoded.items():
        lines.append(f"| {kind} | {fmt} (decoded at load: {reason}) | {impl} | {layers} | — | {held:,} |")
    table = section.get("embedding")
    if table:
        decoded_note = f" (decoded at load: {table['decoded_at_load']})" if table.get("decoded_at_load") else ""
        lines.append(f"| embedding{' (tied lm_head)' if table['tied'] else ''} | {table['format']}{decoded_note} | "
                     f"{table['impl'] or '—'} | — | — | {table['bytes']:,} |")
    w = section["weight_bytes"]
    lines += ["", f"Weights: dense tensors {w['dense']:,} bytes (norms, dense linears; embedding and lm_head when "
                  f"dense) + quantized linears {w['quantized']:,} (held: {w['quantized_prepared']:,})"
                  + (f" + the quantized embedding table {w['embedding']:,}" if w.get("embedding") else "")
                  + (f" + the prepared lm_head {w.get('lm_head_prepared', 0):,}" if w.get("lm_head_prepared") else "")
                  + ".", ""]
    return lines


def head_lines(prepared: dict[str, Any] | None) -> list[str]:
    """One line on the prepared lm_head (none when the logits op reads the dense tensor)."""
    if not prepared:
        return []
    text = (f"lm_head: {prepared['layout']} ({prepared['impl']}), {prepared['prepared_bytes']:,} bytes beside the "
            f"{prepared.get('source', 'dense tensor')}")
    return [text + (f"; not packed: {prepared['reason']}" if prepared.get("reason") else "") + "."]
