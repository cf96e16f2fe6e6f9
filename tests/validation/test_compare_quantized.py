"""validation.compare on quantized checkpoints (written by python -m model.quantize): the device
runs the packed quantized ops, the reference decodes the same containers in float32, and the
report names each linear's format, implementation and bytes."""
from __future__ import annotations

import pytest
from compare_runner import run_cli

from model.quantize import main as quantize
from model.synthetic import write_checkpoint


@pytest.fixture(scope="module")
def int4_int8(tmp_path_factory):
    root = tmp_path_factory.mktemp("cq")
    src = write_checkpoint(root / "tiny", "tiny", seed=1, dtype="bfloat16")
    assert quantize([str(src), str(root / "gptq"), "--format", "gptq-int4", "--asym", "--group-size", "32"]) == 0
    assert quantize([str(src), str(root / "int8"), "--format", "int8", "--group-size", "32"]) == 0
    assert quantize([str(src), str(root / "ternary"), "--format", "ternary"]) == 0
    return root


@pytest.mark.parametrize(("name", "op", "fmt"), [("gptq", "linear_int4", "gptq int4 g32"),
                                                  ("int8", "linear_int8", "rtn int8 g32"),
                                                  ("ternary", "linear_ternary", None)])
def test_compare_names_formats_and_checks_the_quantized_ops(int4_int8, tmp_path, name, op, fmt):
    extra = ["--quantize", "ternary"] if name == "ternary" else []
    run = run_cli(["--device", "cpu", "--dtype", "bfloat16", "--model", str(int4_int8 / name), "--positions", "1",
                   *extra], tmp_path / "r")
    r = run.report
    assert run.code == 0 and r["passed"], r["verdict"]["failures"]
    assert r["bound_ops"][op]["impl"] == "cpu.torch"
    section = r["quantization"]
    assert section["quantized"] and len(section["linears"]) == 4 * 4  # qkv, o, gate_up, down per layer
    formats = {row["format"] for row in section["linears"]}
    if fmt is None:  # ternary per row: one group of K per linear (128 for qkv / o / gate_up, 256 for down)
        formats, fmt = formats - {"bitcpm4 ternary g128"}, "bitcpm4 ternary g256"
    assert formats == {fmt}
    assert all(row["bytes"] > 0 and row["prepared_bytes"] > 0 for row in section["linears"])
    down = next(row for row in section["linears"] if row["linear"] == "layers.0.down")
    assert down["shape"] == [128, 256]
    checked = [c for c in r["conformance"]["cases"] if c["op"] == op]
    assert checked and all(c["status"] == "ok" for c in checked)
    md = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert "## Quantized linears" in md and f"| down | {fmt} | cpu.torch | 4 |" in md
