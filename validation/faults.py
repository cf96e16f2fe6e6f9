"""Injected faults: plausible kernel bugs that a correct verdict must catch (calibration).

Each fault is the CPU torch op (``backends/cpu/ops.py``) with one deliberate error, given to
:func:`hal.load_model` as ``op_overrides``; the one fault an op cannot express (one layer's
residual scale) is a model hook instead (``model.residual_scales``). Every override is plain
torch code on the tensors it is given, so it runs on any device's tensors.

``REQUIRED`` faults must fail ``validation.compare`` on every calibrated model; ``REPORTED``
ones are subtle and only reported (see the calibration table in validation/README.md).
Use: ``fault = FAULTS[name]; model = hal.load_model(..., op_overrides=fault.overrides());
fault.install(model)``, or ``python -m validation.compare --inject-fault NAME``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from backends.cpu import ops as cpu
from hal.errors import InputError


def _future_token_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor | None,
                          scale: float) -> torch.Tensor:
    """Causal mask off by one: query t also sees key t + 1 (left padding as usual)."""
    new = q.shape[1]
    cols = torch.arange(new, device=q.device)
    mask = cols[None, :] <= cols[:, None] + 1  # [T, S]
    mask = mask[None, None].expand(q.shape[0], 1, new, new)
    if kv_start is not None:
        mask = mask & (cols[None, :] >= kv_start.to(q.device)[:, None])[:, None, None, :]
    return cpu._sdpa_masked(q, k, v, mask, False, scale)


def _interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J rotary: pairs (2i, 2i+1) rotated by angle i, where the model uses NeoX pairs
    (i, i + D/2). x `[B, T, heads, D]`; cos/sin `[B, T, 1, D]` in the half layout."""
    half = x.shape[-1] // 2
    xf = x.float()
    even, odd = xf[..., 0::2], xf[..., 1::2]
    c, s = cos[..., :half], sin[..., :half]
    out = torch.stack((even * c - odd * s, odd * c + even * s), dim=-1).flatten(-2)
    return out.to(x.dtype)


def _interleaved_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return _interleaved(q, cos, sin), _interleaved(k, cos, sin)


def _shift_kv_heads(k: torch.Tensor) -> torch.Tensor:
    """Query head h reads KV head (h // group + 1) mod Hk instead of h // group (`[B, S, Hk, D]`)."""
    return k.roll(-1, dims=2)


def _gqa_shift_prefill(q, k, v, kv_start, scale):
    return cpu.attention_prefill_cpu(q, _shift_kv_heads(k), _shift_kv_heads(v), kv_start, scale)


def _gqa_shift_decode(q, k_cache, v_cache, kv_lens, scale):
    return cpu.attention_decode_cpu(q, _shift_kv_heads(k_cache), _shift_kv_heads(v_cache), kv_lens, scale)


def _scaled(factor: float | None) -> dict[str, Callable[..., Any]]:
    """attention with scale ``factor`` x the model's (None: 1.0, FIA's default scale)."""
    def pick(scale: float) -> float:
        return 1.0 if factor is None else scale * factor

    return {"attention_prefill": lambda q, k, v, kv_start, scale:
            cpu.attention_prefill_cpu(q, k, v, kv_start, pick(scale)),
            "attention_decode": lambda q, k_cache, v_cache, kv_lens, scale:
            cpu.attention_decode_cpu(q, k_cache, v_cache, kv_lens, pick(scale))}


def _previous_slot_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """A decode step (T = 1) that reads the previous position's KV slot where its own should be:
    slot kv_lens - 1 is replaced by slot kv_lens - 2 (longer chunks are left correct)."""
    if q.shape[1] == 1:
        k_cache, v_cache = k_cache.clone(), v_cache.clone()
        for row, length in enumerate(kv_lens.tolist()):
            if length >= 2:
                k_cache[row, length - 1] = k_cache[row, length - 2]
                v_cache[row, length - 1] = v_cache[row, length - 2]
    return cpu.attention_decode_cpu(q, k_cache, v_cache, kv_lens, scale)


EPS_FACTOR = 100.0


def _eps_overrides() -> dict[str, Callable[..., Any]]:
    return {"rms_norm": lambda x, weight, eps: cpu.rms_norm_cpu(x, weight, eps * EPS_FACTOR),
            "add_rms_norm": lambda x, residual, weight, eps, scale:
            cpu.add_rms_norm_cpu(x, residual, weight, eps * EPS_FACTOR, scale)}


def _drop_residual_scale(model: Any) -> None:
    """The middle layer adds both its branches without the μP residual scale (α = 1).
    A no-op on models whose α is 1 already (Llama: scale_depth = √L)."""
    layer = len(model.layers) // 2
    model.residual_scales[layer] = 1.0


@dataclass(frozen=True)
class Fault:
    """name: the ``--inject-fault`` value. ops: op -> faulty implementation. hook: changes the
    loaded model in place (for what no op override can express), or None."""

    name: str
    description: str
    required: bool
    ops: Callable[[], dict[str, Callable[..., Any]]] = dict
    hook: Callable[[Any], None] | None = None

    def overrides(self) -> dict[str, Callable[..., Any]]:
        return self.ops()

    def install(self, model: Any) -> None:
        """Apply the model hook, if any (after :func:`hal.load_model` with :meth:`overrides`)."""
        if self.hook is not None:
            self.hook(model)


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("causal-future-token", "causal mask admits one future token (prefill)", True,
          lambda: {"attention_prefill": _future_token_prefill}),
    Fault("rotary-interleaved", "rotary in interleaved (GPT-J) instead of half (NeoX) mode", True,
          lambda: {"rotary": _interleaved_rotary}),
    Fault("gqa-shift", "GQA: query heads read the KV head of the next group", True,
          lambda: {"attention_prefill": _gqa_shift_prefill, "attention_decode": _gqa_shift_decode}),
    Fault("attn-scale-1", "attention scale 1.0 instead of 1/sqrt(head_dim) (FIA's default)", True,
          lambda: _scaled(None)),
    Fault("decode-prev-slot", "a decode step reads the KV slot of the previous position", True,
          lambda: {"attention_decode": _previous_slot_decode}),
    Fault("residual-scale-dropped", "one layer's residual branches added without the residual scale", True,
          hook=_drop_residual_scale),
    Fault("attn-scale-1.05", "attention scale x1.05", False, lambda: _scaled(1.05)),
    Fault("rms-eps-x100", f"rms_norm eps x{EPS_FACTOR:g}", False, _eps_overrides),
)}

REQUIRED = tuple(name for name, f in FAULTS.items() if f.required)
REPORTED = tuple(name for name, f in FAULTS.items() if not f.required)


def get(name: str) -> Fault:
    """The fault called ``name``; InputError listing the known ones otherwise."""
    if name not in FAULTS:
        raise InputError(f"--inject-fault: unknown fault {name!r}; choose one of: {', '.join(FAULTS)}")
    return FAULTS[name]
