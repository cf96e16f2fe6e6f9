"""One GGUF file, read with the ``gguf`` package (llama.cpp's own ``gguf-py`` reader): typed
metadata by key, and tensors dequantized one at a time into torch.

GGUF writes a tensor's shape in ggml order (``ne``: fastest dimension first); ``gguf.GGUFReader``
lists it that way in ``ReaderTensor.shape``. Everything this module returns is in torch order
(``[rows, cols]`` = ``reversed(ne)``), which for a linear weight is the Hugging Face ``[out, in]``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hal.errors import CheckpointError

MAGIC = b"GGUF"


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
            raise CheckpointError(f"{self.path}: GGUF metadata key '{key}' must be an integer, got {value!r}"[:200])
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

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``name`` dequantized (``gguf.quants.dequantize``, float32 numpy) and cast to
        ``dtype`` on the CPU: one float32 copy of this tensor exists at a time."""
        from gguf import quants

        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: missing tensor '{name}'")
        info = self.tensors[name]
        shape = self.shape(name)
        if info.data.nbytes != info.n_bytes:
            raise CheckpointError(f"{self.path}: tensor '{name}' is truncated ({info.data.nbytes} of "
                                  f"{info.n_bytes} bytes present)")
        try:
            values = quants.dequantize(info.data, info.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor '{name}' has unsupported GGUF tensor type "
                                  f"{info.tensor_type.name}") from None
        except Exception as exc:
            raise CheckpointError(f"{self.path}: tensor '{name}' ({info.tensor_type.name}) cannot be "
                                  f"dequantized: {exc}") from None
        if values.dtype != np.float32 or values.size != int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{self.path}: tensor '{name}' of type {info.tensor_type.name} holds "
                                  f"{values.size} values of {values.dtype}, expected {list(shape)} floats")
        if not values.flags.writeable:  # F32: a view of the read-only memory map
            values = values.copy()
        out = torch.from_numpy(values.reshape(shape))
        return out if dtype == torch.float32 else out.to(dtype)
