"""Process memory after a load: hand the heap that loading freed back to the OS.

Loading makes transient copies (the fused projections' parts, dequantized GGUF tensors, the
`[O, K]` originals of ``cpu.torch_kn``'s pre-transposed linears, packed quantized weights). glibc
keeps freed chunks below its mmap threshold in its heap, so their pages stay resident (RSS) after
the load although nothing holds them. ``malloc_trim(0)`` returns the free pages of every arena.
Measured on SmolLM2-135M float32 (benchmarks/RESULTS.md, "CPU decode (issue 13)"): ~60-80 MiB of
RSS after the load. :func:`drop_pages` does the same for the pages of a mapped checkpoint file
that a tensor no longer needs.
"""
from __future__ import annotations

import ctypes
import mmap


def return_freed_heap() -> bool:
    """glibc ``malloc_trim(0)``; False (nothing done) where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: the C library it runs on
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def drop_pages(mapping: mmap.mmap | None, begin: int, end: int) -> None:
    """Drop from the process the pages of ``mapping`` wholly inside bytes ``[begin, end)`` (a page
    shared with a neighbouring tensor stays): ``MADV_DONTNEED``, so unmodified pages of a private file
    mapping are re-read from the file if touched again. Nothing where the platform has no madvise or
    the mapping is gone."""
    first = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (end // mmap.PAGESIZE) * mmap.PAGESIZE
    if mapping is not None and not mapping.closed and last > first and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
