"""The quantized linears' Triton kernels (GEMV and GEMM for int4 with zeros and mins, int8 and
ternary) compile to sm_90 cubins in bfloat16 and float16, without a GPU: the interpreter of
test_quant_linear.py cannot run bfloat16 and lowers neither ``tl.dot`` nor the layouts. Runs
backends/cuda/compile_check.py in a subprocess without TRITON_INTERPRET (as test_compile.py does)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quantized_kernels_compile_for_sm90_in_bfloat16_and_float16(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-m", "backends.cuda.compile_check", "--arch", "90", "--only", "quant",
                           "--dtype", "bf16", "--dtype", "fp16"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    compiled = [line for line in done.stdout.splitlines() if ": ok (shared" in line]
    assert len(compiled) == 12, done.stdout  # {gemv, gemm} x {int4, int8, ternary} x {bf16, fp16}
    assert {line.split()[1] for line in compiled} == {"bf16", "fp16"}
