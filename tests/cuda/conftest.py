"""Runs this folder's Triton kernels compiled on a GPU, interpreted on CPU tensors otherwise
(kernel_cases.py says how the environment stays clean for the other tests)."""
from __future__ import annotations

import pytest
from kernel_cases import import_kernels, interpreter

import_kernels()


@pytest.fixture(autouse=True)
def _triton_interpreter():
    with interpreter():
        yield
