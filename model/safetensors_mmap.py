"""A memory-mapped safetensors reader (header parsed here, data never copied on read).

File layout: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data area; offsets are relative to its start. Every header is first checked by the
``safetensors`` library itself (header length, JSON, dtypes, shapes, offsets in bounds,
contiguous, non-overlapping and covering the data area, byte size = dtype size x elements,
metadata strings), so a file that library refuses is refused here too, with its reason.
Tensors come back as zero-copy views of
a private (copy-on-write) mapping, so loading in the stored dtype costs no second copy. When the
last view of a tensor is gone (its storage freed: after a dtype / device copy, a fused or
repacked copy, a prepare that keeps its own layout), its pages leave the process
(``MADV_DONTNEED``), so a model keeps resident only the mapped tensors it still references.
"""
from __future__ import annotations

import json
import mmap
import struct
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hal.errors import CheckpointError
from model.memory import drop_pages

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100_000_000  # the safetensors library's limit


def library_check(path: Path) -> None:
    """Let the safetensors library validate the header (it maps the file, reads no tensor data:
    well under a millisecond per file, see benchmarks/RESULTS.md). Raises :class:`CheckpointError`
    with the library's reason, e.g. "invalid offset for tensor `model.norm.weight`"."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as exc:
        reason = str(exc).removeprefix("Error while deserializing header: ")
        raise CheckpointError(f"{path}: malformed safetensors header: {reason}"[:400]) from None


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One ``.safetensors`` file, mapped. ``entries`` lists its tensors; :meth:`tensor` views one."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
            size = self.path.stat().st_size
            if size < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", self._fh.read(8))
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{self.path}: not a safetensors file (header length {header_len})")
            library_check(self.path)
            header = json.loads(self._fh.read(header_len))
            self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None
            self._live: dict[str, int] = {}  # name -> views whose storage is alive
            # a view's finalizer runs in whichever thread frees it (reentrant: also from a GC pass inside tensor())
            self._live_lock = threading.RLock()
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.path}: malformed safetensors header: {exc}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: malformed safetensors header (not an object)")
        self.entries = self._parse(header, 8 + header_len, size)

    def close(self) -> None:
        """Unmap the file. Views taken from it must be gone: while one lives, the mapping refuses
        to close (``BufferError``)."""
        if self._map is not None:
            self._map.close()
            self._map = None
        self._fh.close()

    def _parse(self, header: dict, data_start: int, size: int) -> dict[str, TensorEntry]:
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if isinstance(info, dict) and info.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor '{name}' has dtype {info.get('dtype')!r}, "
                                      f"which is not supported (supported: {', '.join(DTYPES)})"[:300])
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{self.path}: tensor '{name}' has a malformed header entry {info!r}"[:300]) from None
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * dtype.itemsize
            if end - begin != nbytes or begin < 0 or data_start + end > size:
                raise CheckpointError(f"{self.path}: tensor '{name}' data offsets {begin}..{end} do not fit "
                                      f"shape {list(shape)} {info['dtype']} in a {size}-byte file")
            entries[name] = TensorEntry(name, dtype, shape, data_start + begin, data_start + end)
        return entries

    def tensor(self, name: str) -> torch.Tensor:
        """Zero-copy view of one tensor (writable, copy-on-write). Its pages are dropped from the
        process when the storage of the last view of ``name`` handed out is freed."""
        e = self.entries[name]
        numel = (e.end - e.begin) // e.dtype.itemsize
        if numel == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        # a buffer of its own per view: the storage holds it, so its finalizer runs when the storage
        # (shared by every view derived from this tensor) is freed, not when this Python object is
        window = memoryview(self._map)[e.begin:e.end]
        with self._live_lock:
            self._live[name] = self._live.get(name, 0) + 1
        weakref.finalize(window, self._view_gone, name).atexit = False
        return torch.frombuffer(window, dtype=e.dtype, count=numel).view(e.shape)

    def _view_gone(self, name: str) -> None:
        with self._live_lock:
            self._live[name] -= 1
            if self._live[name]:
                return
            del self._live[name]
            e = self.entries[name]
            drop_pages(self._map, e.begin, e.end)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors in the safetensors format (used by synthetic checkpoints and tests)."""
    names = {v: k for k, v in DTYPES.items()}
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for t in tensors.values():
            fh.write(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
