"""GGUF files of one model in other tensor types, built for the CPU benchmark only (never in CI):

* :func:`f32_gguf`: every tensor dequantized to F32 by the ``gguf`` package (llama.cpp's own
  dequantization, ``gguf.quants.dequantize``) and written with ``gguf.GGUFWriter``, the metadata
  copied field by field (``general.file_type`` set to ALL_F32);
* :func:`q4_0_gguf`: that F32 file quantized by llama.cpp itself (llama-cpp-python's
  ``llama_model_quantize``, ftype MOSTLY_Q4_0, llama.cpp's default tensor choices: the tied
  embedding gets a wider type, as ``llama-quantize model.gguf Q4_0`` gives a user).

Files are cached in ``$HAL_CACHE_DIR/bench_gguf/`` under the source's name and size, written to a
temporary name and renamed into place, so the cache never holds a partial file.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path

from hal import env
from hal.errors import CheckpointError, DeviceUnavailable

ALL_F32 = 0          # llama_ftype LLAMA_FTYPE_ALL_F32
MOSTLY_Q4_0 = 2      # llama_ftype LLAMA_FTYPE_MOSTLY_Q4_0


def cache_folder() -> Path:
    return env.cache_dir() / "bench_gguf"


def _target(source: Path, kind: str) -> Path:
    stem = source.name.removesuffix(".gguf")
    for suffix in (".Q4_1", ".Q4_0", ".Q8_0", ".F32", ".F16", ".BF16"):
        stem = stem.removesuffix(suffix)
    return cache_folder() / f"{stem}-{source.stat().st_size}.{kind}.gguf"


def _copy_field(writer, field) -> None:
    import gguf

    main = field.types[0]
    if main == gguf.GGUFValueType.ARRAY:
        writer.add_key_value(field.name, field.contents(), main, sub_type=field.types[-1])
    else:
        writer.add_key_value(field.name, field.contents(), main)


def _write_f32(source: Path, out: Path) -> None:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        _copy_field(writer, field)
    writer.add_file_type(ALL_F32)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        writer.add_tensor(tensor.name, np.ascontiguousarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _quantize_q4_0(source: Path, out: Path) -> None:
    try:
        import llama_cpp
    except ImportError:
        raise DeviceUnavailable("llama-cpp-python is not installed: it quantizes the Q4_0 GGUF "
                                "(pip install llama-cpp-python)") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = MOSTLY_Q4_0
    params.nthread = max(1, min(2, os.cpu_count() or 1))
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if status != 0:
        raise CheckpointError(f"{source}: llama_model_quantize to Q4_0 failed (status {status})")


def _build(target: Path, write) -> Path:
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        write(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def f32_gguf(source: Path) -> Path:
    """The F32 GGUF of ``source`` (built on first use, then cached)."""
    return _build(_target(source, "F32"), lambda out: _write_f32(source, out))


def q4_0_gguf(source: Path) -> Path:
    """The Q4_0 GGUF of ``source``, quantized by llama.cpp from :func:`f32_gguf` (cached)."""
    f32 = f32_gguf(source)
    return _build(_target(source, "Q4_0"), lambda out: _quantize_q4_0(f32, out))


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type ``path`` holds, e.g. ``{"Q4_0": 210, "F32": 61, ...}``."""
    import gguf

    return dict(collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors))
