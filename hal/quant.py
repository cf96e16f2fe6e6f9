"""Weight-only quantized linear weights: the device-independent containers that loaders build
(GPTQ, GGUF Q4_0 / Q4_1 / Q8_0, BitCPM4 ternary, ``model.quantize``) and that the ops
``linear_int4``, ``linear_int8`` and ``linear_ternary`` consume (``hal/ops.py``).

Every container is in the ``nn.Linear`` orientation: ``O`` output rows of ``K`` input features,
groups of ``group_size`` consecutive input features per row (``G = K // group_size``; one group
per row is ``group_size == K``). Each one's :meth:`dequantize` is the exact float32 decoding of
its source format (the formula of the format, evaluated in the same order as its reference
decoder: GPTQ as AutoGPTQ, GGUF types as the ``gguf`` package's numpy code), so the float32
reference of every quantized op is ``x.float() @ weight.dequantize().T``.

A backend turns a container into its own layout once, when the model is bound (the op's
``prepare`` in the registry); the op then receives that prepared object. Containers stay on the
CPU until then.

Layouts:

``Int4Weight``: ``w[o, k] = scales[o, g] * (q[o, k] - zeros[o, g]) + mins[o, g]``, ``g = k // group_size``.
    ``packed`` uint8 `[O, K/2]`: ``q[o, 2j] = packed[o, j] & 0xF``, ``q[o, 2j+1] = packed[o, j] >> 4``.
    ``scales``, ``zeros``, ``mins`` float32 `[O, G]` (``mins`` None: no additive term). GPTQ:
    zeros = stored zero + offset, mins None; Q4_0: zeros 8, mins None; Q4_1: zeros 0, mins m.
``Int8Weight``: ``w[o, k] = scales[o, g] * q[o, k]``. ``q`` int8 `[O, K]`, ``scales`` float32
    `[O, G]` (G 1: per output channel; Q8_0: G = K / 32).
``TernaryWeight``: ``w[o, k] = scales[o, g] * t[o, k]``, ``t`` in {-1, 0, +1}. ``packed`` uint8
    `[O, K/4]`: ``t[o, 4j + i] = ((packed[o, j] >> 2i) & 3) - 1`` (2 bits per value, code t + 1).
    ``scales`` float32 `[O, G]`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from hal.errors import CheckpointError

SOURCES = {
    "linear_int4": ("gptq", "gptq_v2", "q4_0", "q4_1", "rtn"),
    "linear_int8": ("q8_0", "rtn"),
    "linear_ternary": ("bitcpm4", "rtn"),
}
"""Where each kind of container may come from (named in reports): ``rtn`` is round-to-nearest by
``python -m model.quantize``; ``bitcpm4`` is a fake-quantized ternary checkpoint packed at load."""


def _check(name: str, cond: bool, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{name}: {what}")


def _check_tensor(name: str, tensor: torch.Tensor, field: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    _check(name, tensor.dtype == dtype and tuple(tensor.shape) == shape,
           f"{field} must be {str(dtype).removeprefix('torch.')} {list(shape)}, got "
           f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}")


def _check_groups(name: str, tensor: torch.Tensor, field: str, out: int, groups: int) -> None:
    _check_tensor(name, tensor, field, torch.float32, (out, groups))


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Fields every container has. ``name``: the checkpoint tensor it came from (for errors and
    reports); ``source``: one of :data:`SOURCES` of its op."""

    name: str
    source: str
    out_features: int
    in_features: int
    group_size: int
    scales: torch.Tensor

    op = ""  # the catalogue op that consumes this container

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def format(self) -> str:
        """What reports print, e.g. ``q4_1 int4 g32``."""
        bits = {"linear_int4": "int4", "linear_int8": "int8", "linear_ternary": "ternary"}[self.op]
        return f"{self.source} {bits} g{self.group_size}"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The container's tensors by field (absent optional fields left out)."""
        return {k: v for k, v in self._fields().items() if v is not None}

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        return replace(self, **{k: (v.to(device) if v is not None else None) for k, v in self._fields().items()})

    def map_rows(self, fn) -> "QuantizedWeight":
        """The same container with ``fn`` (`[O, ...]` -> `[O, ...]`, e.g. a row permutation)
        applied to every per-row field alike."""
        return replace(self, **{k: (fn(v).contiguous() if v is not None else None) for k, v in self._fields().items()})

    def _fields(self) -> dict[str, torch.Tensor | None]:
        raise NotImplementedError

    def _validate_common(self) -> None:
        _check(self.name, self.source in SOURCES[self.op],
               f"source must be one of {', '.join(SOURCES[self.op])}, got {self.source!r}")
        _check(self.name, self.group_size > 0 and self.in_features % self.group_size == 0,
               f"group_size {self.group_size} must divide in_features {self.in_features}")
        _check_groups(self.name, self.scales, "scales", self.out_features, self.groups)

    def dequantize(self) -> torch.Tensor:
        """float32 `[O, K]`: the exact decoding of the source format."""
        return self._decode(self._fields())

    def dequantize_rows(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """float32 `[n, K]`: rows ``rows`` (an int64 index `[n]` or a slice) of :meth:`dequantize`,
        bit for bit, decoding only those rows (the lookups of a quantized token table)."""
        return self._decode(self._rows(rows))

    def dequantize_rows_into(self, rows: torch.Tensor | slice, out: torch.Tensor) -> None:
        """:meth:`dequantize_rows` written into ``out`` (float32 `[n, K]`, contiguous), bit for bit,
        without the decoding's float32 temporaries (the chunked logits of a quantized table)."""
        self._decode_into(self._rows(rows), out)

    def _rows(self, rows: torch.Tensor | slice) -> dict[str, torch.Tensor | None]:
        return {k: (v[rows] if v is not None else None) for k, v in self._fields().items()}

    def _decode(self, fields: dict[str, torch.Tensor | None]) -> torch.Tensor:
        out = torch.empty(fields["scales"].shape[0], self.in_features, dtype=torch.float32, device=self.scales.device)
        self._decode_into(fields, out)
        return out

    def _decode_into(self, fields: dict[str, torch.Tensor | None], out: torch.Tensor) -> None:
        """The format's float32 formula over ``fields`` (the container's per-row tensors, all rows
        or some), evaluated in place in ``out`` `[n, K]`."""
        raise NotImplementedError


def _grouped(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[O, K]` -> `[O, G, group_size]` (a view when contiguous): the layout in which `[O, G, 1]` group values
    broadcast: each weight's product with its group's value, without repeating the group values per weight."""
    return values.reshape(values.shape[0], -1, group_size)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 `[O, K/2]` -> uint8 `[O, K]` values 0..15 (low nibble first)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15 `[O, K]` (K even) -> uint8 `[O, K/2]`, the inverse of :func:`unpack_int4`."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """uint8 `[O, K/4]` -> int8 `[O, K]` values in {-1, 0, 1}."""
    codes = torch.stack([(packed >> (2 * i)) & 3 for i in range(4)], dim=-1).flatten(-2)
    return codes.to(torch.int8) - 1


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """Values in {-1, 0, 1} `[O, K]` (K a multiple of 4) -> uint8 `[O, K/4]`."""
    codes = (t.to(torch.int16) + 1).to(torch.uint8)
    out = codes[:, 0::4]
    for i in range(1, 4):
        out = out | (codes[:, i::4] << (2 * i))
    return out.contiguous()


@dataclass(frozen=True, eq=False)
class Int4Weight(QuantizedWeight):
    packed: torch.Tensor = None  # type: ignore[assignment]
    zeros: torch.Tensor = None  # type: ignore[assignment]
    mins: torch.Tensor | None = None

    op = "linear_int4"

    def __post_init__(self) -> None:
        self._validate_common()
        _check(self.name, self.in_features % 2 == 0, f"in_features {self.in_features} must be even")
        _check_tensor(self.name, self.packed, "packed", torch.uint8, (self.out_features, self.in_features // 2))
        _check_groups(self.name, self.zeros, "zeros", self.out_features, self.groups)
        if self.mins is not None:
            _check_groups(self.name, self.mins, "mins", self.out_features, self.groups)

    def _fields(self) -> dict[str, torch.Tensor | None]:
        return {"packed": self.packed, "scales": self.scales, "zeros": self.zeros, "mins": self.mins}

    def values(self) -> torch.Tensor:
        """uint8 `[O, K]`: the 4-bit codes q."""
        return unpack_int4(self.packed)

    def _decode_into(self, f: dict[str, torch.Tensor | None], out: torch.Tensor) -> None:
        w = _grouped(out, self.group_size)  # s * (q - z) (+ m), each product rounded once
        w.copy_(_grouped(unpack_int4(f["packed"]), self.group_size))
        w.sub_(f["zeros"][..., None]).mul_(f["scales"][..., None])
        if f["mins"] is not None:
            w.add_(f["mins"][..., None])


@dataclass(frozen=True, eq=False)
class Int8Weight(QuantizedWeight):
    q: torch.Tensor = None  # type: ignore[assignment]

    op = "linear_int8"

    def __post_init__(self) -> None:
        self._validate_common()
        _check_tensor(self.name, self.q, "q", torch.int8, self.shape)

    def _fields(self) -> dict[str, torch.Tensor | None]:
        return {"q": self.q, "scales": self.scales}

    def _decode_into(self, f: dict[str, torch.Tensor | None], out: torch.Tensor) -> None:
        w = _grouped(out, self.group_size)  # each code to float32 exactly, then one rounded product
        w.copy_(_grouped(f["q"], self.group_size))
        w.mul_(f["scales"][..., None])


@dataclass(frozen=True, eq=False)
class TernaryWeight(QuantizedWeight):
    packed: torch.Tensor = None  # type: ignore[assignment]

    op = "linear_ternary"

    def __post_init__(self) -> None:
        self._validate_common()
        _check(self.name, self.in_features % 4 == 0, f"in_features {self.in_features} must be a multiple of 4")
        _check_tensor(self.name, self.packed, "packed", torch.uint8, (self.out_features, self.in_features // 4))

    def _fields(self) -> dict[str, torch.Tensor | None]:
        return {"packed": self.packed, "scales": self.scales}

    def values(self) -> torch.Tensor:
        """int8 `[O, K]` in {-1, 0, 1}."""
        return unpack_ternary(self.packed)

    def _decode_into(self, f: dict[str, torch.Tensor | None], out: torch.Tensor) -> None:
        w = _grouped(out, self.group_size)
        w.copy_(_grouped(unpack_ternary(f["packed"]), self.group_size))
        w.mul_(f["scales"][..., None])


def fusable(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    """True when :func:`cat_rows` can stack ``a`` and ``b``: one kind, source, group size and K."""
    return (type(a), a.source, a.group_size, a.in_features) == (type(b), b.source, b.group_size, b.in_features)


def cat_rows(name: str, parts: Sequence[QuantizedWeight]) -> QuantizedWeight:
    """Stack the output rows of several containers of one kind, source and group size (the fused
    q/k/v and gate/up projections). Raises CheckpointError naming ``name`` when they differ."""
    first = parts[0]
    for p in parts[1:]:
        if not fusable(first, p):
            raise CheckpointError(f"{name}: cannot fuse {first.name} ({first.format}, K={first.in_features}) "
                                  f"with {p.name} ({p.format}, K={p.in_features})")
    fields = {}
    for key, value in first._fields().items():
        fields[key] = None if value is None else torch.cat([p._fields()[key] for p in parts], dim=0)
    return replace(first, name=name, out_features=sum(p.out_features for p in parts), **fields)
