"""Process memory after a load: hand the heap that loading freed back to the OS.

Loading makes transient copies (the fused projections' parts, dequantized GGUF tensors, the
`[O, K]` originals of ``cpu.torch_kn``'s pre-transposed linears, packed quantized weights). glibc
keeps freed chunks below its mmap threshold in its heap, so their pages stay resident (RSS) after
the load although nothing holds them. ``malloc_trim(0)`` returns the free pages of every arena.
Measured on SmolLM2-135M float32 (benchmarks/RESULTS.md, "CPU decode (issue 13)"): ~60-80 MiB of
RSS after the load.
"""
from __future__ import annotations

import ctypes


def return_freed_heap() -> bool:
    """glibc ``malloc_trim(0)``; False (nothing done) where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: the C library it runs on
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
