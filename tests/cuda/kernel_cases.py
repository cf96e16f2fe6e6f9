"""Shared by tests/cuda. The Triton kernels of backends/cuda run on a GPU when one exists, else on
CPU tensors under Triton's interpreter. ``TRITON_INTERPRET`` is read when ``@triton.jit``
decorates a kernel and again when triton imports parts of itself at the first launch, so this
folder's conftest sets it while the kernel modules are imported (:func:`import_kernels`) and
while each of its tests runs (an autouse fixture), and restores it after each: no other test,
and no subprocess another test starts, sees it.

bfloat16 is tested on a GPU only: the interpreter returns garbage for bfloat16 loads and stores
of CPU tensors (measured with triton 3.9), so under the interpreter the dtypes are float32 and
float16.

Cases use the conformance machinery (validation/opcheck.py: seeded inputs, garbage and NaN past
each row's length, NMSE against the float32 reference with the catalogue's tolerance)."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys

import torch

from validation.opcheck import Case, case, check

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = ("float32", "float16", "bfloat16") if ON_GPU else ("float32", "float16")
KERNEL_MODULES = ("backends.cuda.decode_attention", "backends.cuda.infllm", "backends.cuda.lightning",
                  "backends.cuda.quant_linear")


@contextlib.contextmanager
def interpreter():
    """``TRITON_INTERPRET=1`` inside (without a GPU), the previous value after."""
    if ON_GPU:
        yield
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def import_kernels() -> None:
    with interpreter():
        for name in KERNEL_MODULES:
            if name in sys.modules and not ON_GPU:  # imported earlier with compiled (GPU-only) kernels
                importlib.reload(sys.modules[name])
            else:
                importlib.import_module(name)


def cases(op: str, shapes: list[tuple[dict[str, int], tuple[str, ...]]]) -> list:
    """pytest params, one per dtype of this machine and shape, with conformance ids."""
    import pytest

    found = [case(op, dtype, flags, **dims) for dtype in DTYPES for dims, flags in shapes]
    return [pytest.param(c, id=c.test_id) for c in found]


def assert_matches_reference(c: Case, fn) -> None:
    result = check(c, fn, "cuda.triton", DEVICE)
    assert result.status == "ok", result.line() + (f" {result.reason}" if result.reason else "")
