"""Our mmap safetensors reader on files written by the ``safetensors`` library itself (not by our
own writer, whose dtype table the reader shares): every dtype the library saves is read back
bit for bit with the library's torch dtype, or refused in one line naming the tensor and dtype."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from hal.errors import CheckpointError
from model.safetensors_mmap import SafetensorsFile

SUPPORTED = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
             torch.int16, torch.int8, torch.uint8, torch.bool}
"""What a MiniCPM checkpoint may hold (the reader's promise)."""
UNSUPPORTED = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64",
                                                  "complex64") if hasattr(torch, name)]


def _values(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random values plus the awkward ones (NaN, +-inf, -0, subnormals; integer extremes)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
        flat = t.view(-1)
        specials = [float("nan"), float("inf"), float("-inf"), -0.0, torch.finfo(dtype).tiny / 4]
        n = min(len(specials), flat.numel())
        flat[:n] = torch.tensor(specials[:n], dtype=torch.float64).to(dtype)
        return t
    info = torch.iinfo(dtype)
    t = torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)
    n = min(2, t.numel())
    t.view(-1)[:n] = torch.tensor([info.min, info.max][:n], dtype=torch.int64).to(dtype)
    return t


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


@pytest.mark.parametrize("dtype", sorted(SUPPORTED, key=str), ids=str)
def test_library_files_read_back_bit_exactly(tmp_path, dtype):
    tensors = {"a.weight": _values(dtype, (7, 13), 1), "b": _values(dtype, (3,), 2),
               "empty": _values(dtype, (0, 4), 3), "scalar": _values(dtype, (), 4),
               "z.last": _values(dtype, (2, 2, 5), 5)}
    path = tmp_path / "lib.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    reader = SafetensorsFile(path)
    assert set(reader.entries) == set(tensors)
    for name, original in tensors.items():
        got = reader.tensor(name)
        assert got.dtype == original.dtype, f"{name}: read as {got.dtype}, written as {original.dtype}"
        assert tuple(got.shape) == tuple(original.shape), name
        assert _bytes(got) == _bytes(original), f"{name}: bytes differ"


def test_mixed_dtypes_in_one_library_file(tmp_path):
    """Offsets of tensors of different sizes, as the library lays them out (sorted by dtype)."""
    tensors = {f"t{i}": _values(dtype, (5 + i, 3), i) for i, dtype in enumerate(sorted(SUPPORTED, key=str))}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    reader = SafetensorsFile(path)
    for name, original in tensors.items():
        got = reader.tensor(name)
        assert got.dtype == original.dtype and _bytes(got) == _bytes(original), name


@pytest.mark.parametrize("dtype", UNSUPPORTED, ids=str)
def test_dtypes_we_do_not_read_are_refused_in_one_line(tmp_path, dtype):
    path = tmp_path / "other.safetensors"
    ok = torch.zeros(2, 2)
    other = torch.zeros(4, dtype=torch.float32).to(dtype) if dtype.is_floating_point or dtype.is_complex \
        else torch.zeros(4, dtype=torch.int64).to(dtype)
    save_file({"fine": ok, "odd.weight": other}, str(path))
    code = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "uint16": "U16", "uint32": "U32",
            "uint64": "U64", "complex64": "C64"}[str(dtype).removeprefix("torch.")]
    with pytest.raises(CheckpointError) as err:
        SafetensorsFile(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "odd.weight" in message and code in message
