"""Every Triton kernel compiles to a cubin for sm_90 (H100 / H200) in bfloat16, without a GPU: the
interpreter the other tests use cannot run bfloat16 and does not lower layouts, ``tl.dot``
shapes or shared memory, so this is CI's only check that the GPU build works. Runs
backends/cuda/compile_check.py in a subprocess without TRITON_INTERPRET (triton's interpreter
mode is process-wide once a kernel ran)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90_bfloat16(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, and not into the user's cache
    done = subprocess.run([sys.executable, "-m", "backends.cuda.compile_check", "--arch", "90", "--quick"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    compiled = [line for line in done.stdout.splitlines() if ": ok (shared" in line]
    # decode split, combine, stage-1 scores, block-sparse, lightning, quantized int4 GEMV and GEMM
    assert len(compiled) == 7, done.stdout
