"""One GGUF file, read with the ``gguf`` package (llama.cpp's own ``gguf-py`` reader): typed
metadata by key, and tensors dequantized one at a time into torch.

GGUF writes a tensor's shape in ggml order (``ne``: fastest dimension first); ``gguf.GGUFReader``
lists it that way in ``ReaderTensor.shape``. Everything this module returns is in torch order
(``[rows, cols]`` = ``reversed(ne)``), which for a linear weight is the Hugging Face ``[out, in]``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hal.errors import CheckpointError
from model.memory import drop_pages

MAGIC = b"GGUF"
CHUNK_BYTES = 16 << 20
"""float32 bytes dequantized at a time (per tensor: whole rows)."""


def looks_like_gguf(path: str | Path) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic (or is named ``*.gguf``)."""
    path = Path(path)
    if not path.is_file():
        return path.suffix.lower() == ".gguf"
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return path.suffix.lower() == ".gguf"


def _shortest_float32(value: float) -> float:
    """The shortest decimal that rounds to this float32: GGUF stores metadata floats in float32, and
    the converter's float64 source (``1e-05``, ``0.7``, ``10000.0``) is that decimal whenever it
    had at most ~7 significant digits; otherwise this is the float32 value itself."""
    return float(str(np.float32(value)))


class GGUFFile:
    """``GGUFFile(path)``: metadata lookups that name the key on failure, and
    :meth:`tensor` (dequantized, torch order). Raises :class:`CheckpointError` for a file the
    reader cannot parse (bad magic, truncated, unsupported version)."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: GGUF file not found")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as exc:  # the reader raises ValueError, KeyError, IndexError, ... on bad bytes
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({reason})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = self.string("general.architecture")

    # -- metadata ------------------------------------------------------------------------------

    def key(self, template: str) -> str:
        """``gguf.Keys`` templates hold ``{arch}``: ``"{arch}.block_count"`` -> ``"llama.block_count"``."""
        return template.format(arch=self.architecture)

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def _field(self, key: str):
        field = self.reader.fields.get(key)
        if field is None:
            raise CheckpointError(f"{self.path}: missing GGUF metadata key '{key}'")
        return field

    def value(self, key: str, default: Any = ...) -> Any:
        """A scalar or array value as Python objects (float32 floats as their shortest decimal)."""
        import gguf

        if key not in self.reader.fields:
            if default is ...:
                raise CheckpointError(f"{self.path}: missing GGUF metadata key '{key}'")
            return default
        field = self._field(key)
        try:
            value = field.contents()
        except Exception as exc:
            raise CheckpointError(f"{self.path}: GGUF metadata key '{key}' is unreadable ({exc})") from None
        if field.types and field.types[-1] == gguf.GGUFValueType.FLOAT32:
            value = [_shortest_float32(v) for v in value] if isinstance(value, list) else _shortest_float32(value)
        return value

    def string(self, key: str, default: Any = ...) -> Any:
        value = self.value(key, default)
        if value is not default and not isinstance(value, str):
            raise CheckpointError(f"{self.path}: GGUF metadata key '{key}' must be a string, got {value!r}"[:200])
        return value

    def integer(self, key: str, default: Any = ...) -> Any:
        value = self.value(key, default)
        if value is not default and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointError(f"{self.path}: GGUF metadata key '{key}' must be an integer, "
                                  f"got {value!r}"[:200])
        return value

    def number(self, key: str, default: Any = ...) -> Any:
        value = self.value(key, default)
        if value is not default and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise CheckpointError(f"{self.path}: GGUF metadata key '{key}' must be a number, got {value!r}"[:200])
        return value

    def boolean(self, key: str, default: Any = ...) -> Any:
        value = self.value(key, default)
        if value is not default and not isinstance(value, bool):
            raise CheckpointError(f"{self.path}: GGUF metadata key '{key}' must be true or false, got {value!r}")
        return value

    def strings(self, key: str, default: Any = ...) -> Any:
        value = self.value(key, default)
        if value is not default and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise CheckpointError(f"{self.path}: GGUF metadata key '{key}' must be an array of strings")
        return value

    # -- tensors -------------------------------------------------------------------------------

    def shape(self, name: str) -> tuple[int, ...]:
        """Torch-order shape of tensor ``name`` (no data read)."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def tensor(self, name: str, dtype: torch.dtype, part: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` dequantized (``gguf.quants.dequantize``) into ``dtype`` on the CPU. Rows
        are dequantized in chunks of about :data:`CHUNK_BYTES` of float32 (a row holds whole
        quantization blocks), so the float32 intermediate never holds the whole tensor; the
        tensor's mapped file pages are released afterwards. part: (dim, start, length) of a 2-D
        tensor, the only rows (dim 0: only those are read) or columns (dim 1: each chunk's are
        kept) returned, for a tensor-parallel rank (``model/sharding.py``)."""
        from gguf import quants

        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: missing tensor '{name}'")
        info = self.tensors[name]
        shape = self.shape(name)
        if info.data.nbytes != info.n_bytes:
            raise CheckpointError(f"{self.path}: tensor '{name}' is truncated ({info.data.nbytes} of "
                                  f"{info.n_bytes} bytes present)")
        rows = shape[0] if len(shape) > 1 else 1
        full = math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)  # elements per row
        data = info.data.reshape(rows, -1)
        columns, width = slice(None), full
        if part is not None and part[0] == 0:
            data, rows = data[part[1]:part[1] + part[2]], part[2]
        elif part is not None:
            columns, width = slice(part[1], part[1] + part[2]), part[2]
        out = torch.empty(rows, width, dtype=dtype)
        step = max(1, CHUNK_BYTES // max(1, 4 * full))
        for first in range(0, rows, step):
            values = self._dequantize(quants, name, info.tensor_type, data[first:first + step])
            if values.size != min(step, rows - first) * full:
                raise CheckpointError(f"{self.path}: tensor '{name}' of type {info.tensor_type.name} does "
                                      f"not dequantize to its shape {list(shape)}")
            values = values.reshape(-1, full)[:, columns]
            if not values.flags.writeable or not values.flags.c_contiguous:  # F32: a view of the read-only map
                values = np.array(values, order="C")
            out[first:first + step] = torch.from_numpy(values)
        self.release(name)
        return out.reshape(shape) if part is None else out

    def _dequantize(self, quants, name: str, kind, data: np.ndarray) -> np.ndarray:
        try:
            values = quants.dequantize(data, kind)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor '{name}' has unsupported GGUF tensor type "
                                  f"{kind.name}") from None
        except Exception as exc:
            raise CheckpointError(f"{self.path}: tensor '{name}' ({kind.name}) cannot be dequantized: "
                                  f"{exc}") from None
        if values.dtype != np.float32:
            raise CheckpointError(f"{self.path}: tensor '{name}' of type {kind.name} dequantized to "
                                  f"{values.dtype}, expected float32")
        return values

    def release(self, name: str) -> None:
        """Drop the mapped file pages of tensor ``name`` from the process (they were copied)."""
        info = self.tensors[name]
        mapping = getattr(self.reader.data, "_mmap", None)  # numpy.memmap's mmap.mmap
        drop_pages(mapping, info.data_offset, info.data_offset + info.n_bytes)

    def forget_vocabulary(self) -> None:
        """Drop the parsed token arrays (``tokenizer.ggml.*`` lists: ~150 MB of reader objects for
        a 49k vocabulary) once the tokenizer and the config are built."""
        import gguf

        keys = gguf.Keys.Tokenizer
        for key in (keys.LIST, keys.MERGES, keys.SCORES, keys.TOKEN_TYPE):
            self.reader.fields.pop(key, None)
