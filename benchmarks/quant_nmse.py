"""NMSE of every quantized-linear kernel against the float32 reference, per source format and
dtype, and what rounding the scales (zeros, mins) to a 16-bit dtype costs:

    python -m benchmarks.quant_nmse [--trained] [--json out.json]                    # on a GPU
    TRITON_INTERPRET=1 python -m benchmarks.quant_nmse [--trained] [--json out.json]  # without one

- ``output``: ``sum((y - ref)^2) / sum(ref^2)`` of the op's output, ``ref = x @ W.T`` in float64
  with ``W = container.dequantize()`` (x rounded to the dtype first, as the conformance check
  does), for decode rows (T=1, the GEMV path) and prefill rows (T=19, GEMM). Kernels:
  ``cuda.triton`` (on a GPU: float32 / float16 / bfloat16; interpreted on CPU tensors: no bfloat16),
  ``npu.torch_npu`` / ``npu.torch_unpack`` (the emulated NPU: bfloat16 / float16), and the dense
  decoding in the same dtype (``dequant``) as the baseline every dtype pays anyway.
- ``weights``: the NMSE of the decoded weight itself when the scales (zeros, mins) are stored in
  float16 / bfloat16 (``scales:<dtype>``), and as ``npu_weight_quant_batchmatmul`` antiquantizes it,
  ``((q - 8) + offset) * scale`` in x's dtype (``npu-antiquant:<dtype>``), beside the plain rounding
  of the dense weight to that dtype (``dense:<dtype>``).

Containers: random codes with trained-like magnitudes (``validation.opcheck.random_container``), K =
O = 512; ``--trained``: also the trained fixture's real Q4_1 / Q8_0 tensors (tests/quant_trained_weights.py).
Numbers from the NPU rows are EMULATED.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

FORMATS = [("linear_int4", "q4_0", 32), ("linear_int4", "q4_1", 32), ("linear_int4", "gptq", 128),
           ("linear_int8", "q8_0", 32), ("linear_int8", "rtn", 512), ("linear_ternary", "bitcpm4", 512),
           ("linear_ternary", "rtn", 64)]
ROWS = (1, 19)


def _nmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    r, o = ref.double(), out.double()
    return float(((r - o) ** 2).sum() / (r ** 2).sum())


def _triton_device() -> str:
    """Where the Triton kernels run: the GPU, or CPU tensors under TRITON_INTERPRET=1."""
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"


def _kernels(op: str):
    """(label, dtypes, prepare, fn) of each kernel of ``op`` measured here."""
    from backends.cpu.quantized_dequant import linear_dequantized, prepare_dequantized
    from backends.cuda import quant_linear as ql
    from backends.npu import quant_linear as nq

    triton_dtypes = ("float32", "float16") + (("bfloat16",) if _triton_device() == "cuda" else ())
    found = [("cuda.triton", triton_dtypes, ql.prepare_packed, ql.linear_quantized_triton)]
    if op == "linear_ternary":
        found.append(("npu.torch_unpack", ("bfloat16", "float16"), nq.prepare_packed_ternary, nq.linear_ternary_npu))
    else:
        found.append(("npu.torch_npu", ("bfloat16", "float16"), nq.prepare_weight_quant, nq.linear_weight_quant_npu))
    found.append(("dequant", ("float32", "bfloat16", "float16"), prepare_dequantized, linear_dequantized))
    return found


def _weights_rows(label: str, weight) -> list[dict[str, Any]]:
    from backends.npu.quant_linear import antiquant_offset
    from hal import quant

    exact = weight.dequantize().double()
    out = []
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        rounded = {k: (v.to(dtype).float() if v is not None and k != "packed" and v.is_floating_point() else v)
                   for k, v in weight._fields().items()}
        scaled = type(weight)(**{**{f: getattr(weight, f) for f in ("name", "source", "out_features", "in_features",
                                                                      "group_size")}, **rounded})
        out.append({"weights": label, "variant": f"scales:{name}", "nmse": _nmse(exact, scaled.dequantize())})
        out.append({"weights": label, "variant": f"dense:{name}", "nmse": _nmse(exact, exact.to(dtype))})
        if isinstance(weight, quant.Int4Weight):
            expand = (lambda t: t.repeat_interleave(weight.group_size, dim=1).to(dtype))
            w = ((weight.values().to(torch.int32) - 8).to(dtype) + expand(antiquant_offset(weight))) * expand(weight.scales)
            out.append({"weights": label, "variant": f"npu-antiquant:{name}", "nmse": _nmse(exact, w)})
    return out


def measure(trained: Path | None = None) -> dict[str, list[dict[str, Any]]]:
    from hal.registry import BindContext
    from validation.opcheck import random_container

    os.environ.setdefault("HAL_NPU_EMULATE", "1")
    g = torch.Generator().manual_seed(0)
    weights = [(f"{src} g{gs}", random_container(g, op, src, 512, 512, gs)) for op, src, gs in FORMATS]
    if trained is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from quant_trained_weights import trained_containers

        weights += [(f"trained {w.name} {w.format}", w) for w in trained_containers(str(trained))]
    outputs, decoded = [], []
    for label, weight in weights:
        decoded += _weights_rows(label, weight)
        for kernel, dtypes, prepare, fn in _kernels(weight.op):
            for dtype in dtypes:
                torch_dtype = getattr(torch, dtype)
                device = {"npu": "npu", "cuda": _triton_device()}.get(kernel.split(".")[0], "cpu")
                prepared = prepare(weight, BindContext(device, torch_dtype))
                where = torch.device("cuda" if device == "cuda" else "cpu")
                for rows in ROWS:
                    x = torch.randn(rows, weight.in_features, generator=g).to(torch_dtype)
                    ref = x.double() @ weight.dequantize().double().t()
                    outputs.append({"weights": label, "kernel": kernel, "dtype": dtype, "rows": rows,
                                    "nmse": _nmse(ref, fn(x.to(where), prepared).cpu())})
    return {"outputs": outputs, "weights": decoded}


def table(result: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| weights | kernel | dtype | NMSE T=1 | NMSE T=19 |", "|---|---|---|---|---|"]
    rows: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in result["outputs"]:
        rows.setdefault((r["weights"], r["kernel"], r["dtype"]), {})[r["rows"]] = r["nmse"]
    for (w, k, d), by in rows.items():
        lines.append(f"| {w} | {k} | {d} | {by[1]:.2e} | {by[19]:.2e} |")
    lines += ["", "| weights | decoded weight | NMSE |", "|---|---|---|"]
    lines += [f"| {r['weights']} | {r['variant']} | {r['nmse']:.2e} |" for r in result["weights"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_nmse", description=__doc__.split("\n\n")[0])
    p.add_argument("--trained", action="store_true", help="also the trained fixture's Q4_1 / Q8_0 tensors")
    p.add_argument("--json", type=Path, help="write the numbers here too")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        print("error: no GPU: run with TRITON_INTERPRET=1 (the Triton kernels interpreted on CPU tensors)",
              file=sys.stderr)
        return 2
    trained = None
    if args.trained:
        from model import trained as fixture

        try:
            trained = fixture.trained_gguf()
        except fixture.TrainedModelMissing as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    result = measure(trained)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
