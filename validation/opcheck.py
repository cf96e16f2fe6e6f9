"""Op cases and the NMSE check: one implementation against the float32 reference.

A :class:`Case` is an op, a dtype and named sizes (shape letters of ``hal/ops.py``). Inputs are
drawn in float32 from a seeded generator and rounded to the case dtype once, so the
implementation under test and the reference see the same values; the reference computes on
their float32 upcast (the judge never sees a rounded intermediate). The metric is ggml's
``NMSE = sum((ref - out)^2) / sum(ref^2)`` after a NaN check and an inf-sign check, compared
with the op's catalogue tolerance (``OpSpec.nmse``); integer outputs (sampled ids) are compared
as the fraction of mismatches.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from hal import quant
from hal.probing import torch_device
from hal.ops import get_spec
from hal.registry import BindContext, Impl, implementations
from hal.sparse import InfLLMGeometry

SHORT_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
TORCH_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Case:
    """op: catalogue name. dtype: ``float32`` / ``bfloat16`` / ``float16``. dims: sizes by
    shape letter (B, T, S, C, H, Hk, D, E, F, K, O, V), plus W / R (a kernel's size and stride,
    infllm_compress_keys / infllm_append_kernel) and :data:`GEOMETRY_DIMS` (an InfLLM-v2
    geometry). flags: ``padded`` (left padding via
    kv_start; kv_write: -1 slots), ``ragged`` (attention_decode / kv_write: rows of different
    lengths), ``ties`` (sample: equal top logits), ``state`` (lightning_attention: continues
    from a non-zero state instead of zeros), ``tiny`` / ``wide`` (logits: a weight far below
    float16's range / spanning more binades than float16 holds, :data:`TINY_SCALE`)."""

    op: str
    dtype: str
    dims: tuple[tuple[str, int], ...]
    flags: tuple[str, ...] = ()

    def dim(self, letter: str) -> int:
        return dict(self.dims)[letter]

    @property
    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.dims] + list(self.flags) + [f"dtype={SHORT_DTYPE[self.dtype]}"]
        return f"{self.op}({','.join(parts)})"

    @property
    def test_id(self) -> str:
        """pytest id, e.g. ``B1-T63-H16-Hk2-D128-padded-bf16``."""
        return "-".join([f"{k}{v}" for k, v in self.dims] + list(self.flags) + [SHORT_DTYPE[self.dtype]])

    def context(self, device: str) -> BindContext:
        """What ``supports()`` is asked with: the case's sizes under the model's letters."""
        d = dict(self.dims)
        shapes = {k: d[k] for k in ("E", "F", "V", "H", "Hk", "D", "G") if k in d}
        if "K" in d:
            shapes.setdefault("E", d["K"])
        return BindContext(device=device, dtype=TORCH_DTYPE[self.dtype], shapes=shapes)


def case(op: str, dtype: str, flags: tuple[str, ...] = (), **dims: int) -> Case:
    return Case(op, dtype, tuple(dims.items()), flags)


# -- inputs ------------------------------------------------------------------------------------

def _randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def _rope(g: torch.Generator, batch: int, new: int, start: int,
          dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, T, D]`` float32 for positions start..start+T-1 with LongRoPE-like factors
    (unscaled, in [-1, 1]: mscale is applied outside the rotary op, see model/rope.py)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    inv_freq = inv_freq / (1.0 + torch.rand(dim // 2, generator=g))
    pos = torch.arange(start, start + new).float()
    emb = torch.outer(pos, inv_freq)
    emb = torch.cat((emb, emb), dim=-1)
    return emb.cos().expand(batch, new, dim), emb.sin().expand(batch, new, dim)


def _kv_start(c: Case, keys: int) -> torch.Tensor | None:
    if "padded" not in c.flags:
        return None
    batch = c.dim("B")
    # row 0 unpadded; later rows padded by growing amounts (at most keys - 1)
    return torch.tensor([min(b * max(1, keys // 3), keys - 1) for b in range(batch)], dtype=torch.int64)


def _kv_lens(c: Case) -> torch.Tensor:
    """attention_decode: every row holds S keys, or (``ragged``) S, S - S//3, ... (at least 1)."""
    s, batch = c.dim("S"), c.dim("B")
    step = max(1, s // 3) if "ragged" in c.flags else 0
    return torch.tensor([max(1, s - b * step) for b in range(batch)], dtype=torch.int64)


GARBAGE = 1e3
"""Scale of the values written past a row's kv_lens (unused positions) in attention_decode cases:
an implementation that lets them into its softmax fails; beyond the longest row they are NaN."""


def _ragged_cache(g: torch.Generator, kv_lens: torch.Tensor, capacity: int, heads: int,
                  dim: int) -> torch.Tensor:
    """`[B, C, Hk, D]`: randn up to each row's length, ``GARBAGE * randn`` from there to the longest
    row, NaN after it."""
    cache = _randn(g, len(kv_lens), capacity, heads, dim)
    longest = int(kv_lens.max())
    for b, n in enumerate(kv_lens.tolist()):
        cache[b, n:longest] *= GARBAGE
    cache[:, longest:] = float("nan")
    return cache


def _slots(c: Case) -> torch.Tensor:
    """kv_write slots `[B, T]`: row b continues at a row-dependent length (``ragged``) or writes
    from 0 with its first b*T//3 tokens skipped as left padding (``padded``: -1)."""
    batch, new, capacity = c.dim("B"), c.dim("T"), c.dim("C")
    rows = []
    for b in range(batch):
        if "padded" in c.flags:
            pad = min(b * max(1, new // 3), new - 1)
            row = torch.arange(new) - pad
            rows.append(torch.where(row >= 0, row, torch.full_like(row, -1)))
        else:
            start = (b * 37) % (capacity - new + 1) if "ragged" in c.flags else 0
            rows.append(torch.arange(start, start + new))
    return torch.stack(rows).to(torch.int64)


GEOMETRY_DIMS = {"KS": "kernel_size", "KR": "kernel_stride", "CS": "coarse_size", "CR": "coarse_stride",
                 "BS": "block_size", "IB": "init_blocks", "LB": "local_blocks", "BU": "budget"}
"""Case dims that carry an InfLLM-v2 geometry (infllm_select_blocks, block_sparse_attention)."""


def geometry_dims(g: InfLLMGeometry) -> dict[str, int]:
    return {letter: getattr(g, name) for letter, name in GEOMETRY_DIMS.items()}


def geometry(c: Case) -> InfLLMGeometry:
    dims = dict(c.dims)
    return InfLLMGeometry(**{name: dims[letter] for letter, name in GEOMETRY_DIMS.items()})


def _kernels(g: torch.Generator, kv_lens: torch.Tensor, capacity: int, heads: int, dim: int, size: int,
             stride: int) -> torch.Tensor:
    """Semantic kernels `[B, N, Hk, D]` of random values, NaN where a row has no complete kernel
    (infllm_select_blocks must not read them)."""
    count = max(0, (capacity - size) // stride + 1)
    kernels = _randn(g, len(kv_lens), count, heads, dim, scale=0.5)
    for b, n in enumerate(kv_lens.tolist()):
        kernels[b, max(0, (n - size) // stride + 1):] = float("nan")
    return kernels


def _selected_blocks(g: torch.Generator, kv_lens: torch.Tensor, new: int, kv_heads: int, budget: int,
                     block: int) -> torch.Tensor:
    """Random valid block_sparse_attention selections `[B, Hk, T, K]`: up to K distinct blocks
    at or before each query's own, ascending, -1 padded (some queries select none)."""
    batch = len(kv_lens)
    out = torch.full((batch, kv_heads, new, budget), -1, dtype=torch.int64)
    for b in range(batch):
        for t in range(new):
            qb = (int(kv_lens[b]) - new + t) // block
            for h in range(kv_heads):
                if qb < 0 or (b + h + t) % 7 == 6:
                    continue  # selects nothing
                take = torch.randperm(qb + 1, generator=g)[:budget].sort().values
                out[b, h, t, :len(take)] = take
    return out


def sala_slopes(heads: int) -> torch.Tensor:
    """`[H]` float32 decay rates spread over MiniCPM-SALA's 32 ALiBi slopes ``2^(-(h+1)/4)`` (its
    ``_build_slope_tensor(32)``, sala_spec.md §5.2), from the fastest decay (0.84 per token,
    lambda 0.43) to the slowest (0.0039, lambda 0.996)."""
    sala = 2.0 ** (-(torch.arange(32, dtype=torch.float32) + 1) / 4)
    return sala[torch.linspace(0, 31, heads).round().long()]


TINY_SCALE = 2.0 ** -20
"""``tiny`` logits weights: N(0, 0.02) times this, far below float16's normal range (2^-14): a
float16 copy holds them only if scaled (``cpu.fbgemm``'s power of two)."""
WIDE_ROWS_SCALE = 2.0 ** -40
"""``wide`` logits weights: every third vocabulary row times this, so the weight spans more
binades than float16 holds at any one scale (``cpu.fbgemm`` must refuse it in bfloat16)."""


def _weight_range(c: Case, weight: torch.Tensor) -> torch.Tensor:
    """logits: the ``tiny`` / ``wide`` dynamic ranges of the weight `[V, E]` (see above)."""
    if "tiny" in c.flags:
        return weight * TINY_SCALE
    if "wide" in c.flags:
        weight[::3] *= WIDE_ROWS_SCALE
    return weight


FLOAT32_ARGS = frozenset({"cos", "sin", "logits", "slopes", "state"})
"""Float arguments that are float32 by contract: never rounded to the case dtype."""


def random_container(g: torch.Generator, op: str, source: str, out: int, k: int, group: int) -> quant.QuantizedWeight:
    """A ``hal.quant`` container of random codes with scales (zeros, mins) of a trained linear's
    magnitude (weights of std ~ K**-0.5)."""
    groups = k // group
    scales = (torch.rand(out, groups, generator=g) + 0.5) * k ** -0.5 / 4
    common = {"name": f"grid.{op}", "source": source, "out_features": out, "in_features": k, "group_size": group,
              "scales": scales}
    if op == "linear_int4":
        codes = torch.randint(0, 16, (out, k), generator=g)
        if source == "gptq":  # asymmetric: a zero point per group
            zeros = torch.randint(6, 10, (out, groups), generator=g).float()
        else:
            zeros = torch.full((out, groups), 0.0 if source == "q4_1" else 8.0)
        mins = -8 * scales * (1 + 0.1 * _randn(g, out, groups)) if source == "q4_1" else None
        return quant.Int4Weight(**common, packed=quant.pack_int4(codes), zeros=zeros, mins=mins)
    if op == "linear_int8":
        scales = scales / 16
        return quant.Int8Weight(**{**common, "scales": scales},
                                q=torch.randint(-127, 128, (out, k), generator=g).to(torch.int8))
    return quant.TernaryWeight(**{**common, "scales": scales * 4},
                               packed=quant.pack_ternary(torch.randint(-1, 2, (out, k), generator=g)))


def make_inputs(c: Case, seed: int = 0) -> dict[str, Any]:
    """The case's keyword arguments, float tensors in float32 already rounded to ``c.dtype``."""
    g = torch.Generator().manual_seed(seed)
    d = dict(c.dims)
    b, t = d.get("B", 1), d.get("T", 1)
    if c.op == "embedding":
        args = {"ids": torch.randint(0, d["V"], (b, t), generator=g), "weight": _randn(g, d["V"], d["E"])}
    elif c.op == "rms_norm":
        args = {"x": _randn(g, b, t, d["E"], scale=3.0), "weight": 1 + _randn(g, d["E"], scale=0.1),
                "eps": 1e-5}
    elif c.op == "add_rms_norm":
        args = {"x": _randn(g, b, t, d["E"]), "residual": _randn(g, b, t, d["E"], scale=2.0),
                "weight": 1 + _randn(g, d["E"], scale=0.1), "eps": 1e-5, "scale": 0.35}
    elif c.op == "rotary":
        cos, sin = _rope(g, b, t, d.get("P", 5), d["D"])
        args = {"q": _randn(g, b, t, d["H"], d["D"]), "k": _randn(g, b, t, d["Hk"], d["D"]),
                "cos": cos, "sin": sin}
    elif c.op == "swiglu":
        args = {"gate": _randn(g, b, t, d["F"], scale=2.0), "up": _randn(g, b, t, d["F"])}
    elif c.op == "sigmoid_gate":
        args = {"x": _randn(g, b, t, d["E"]), "gate": _randn(g, b, t, d["E"], scale=3.0)}
    elif c.op == "linear":
        args = {"x": _randn(g, b, t, d["K"]), "weight": _randn(g, d["O"], d["K"], scale=d["K"] ** -0.5)}
    elif c.op in ("linear_int4", "linear_int8", "linear_ternary"):
        args = {"x": _randn(g, b, t, d["K"]), "weight": random_container(g, c.op, c.flags[0], d["O"], d["K"], d["G"])}
    elif c.op == "logits":
        args = {"x": _randn(g, b, t, d["E"], scale=4.0), "weight": _weight_range(c, _randn(g, d["V"], d["E"], scale=0.02))}
    elif c.op == "attention_prefill":
        args = {"q": _randn(g, b, t, d["H"], d["D"]), "k": _randn(g, b, t, d["Hk"], d["D"]),
                "v": _randn(g, b, t, d["Hk"], d["D"]), "kv_start": _kv_start(c, t), "scale": d["D"] ** -0.5}
    elif c.op == "attention_decode":
        kv_lens = _kv_lens(c)
        args = {"q": _randn(g, b, t, d["H"], d["D"]),
                "k_cache": _ragged_cache(g, kv_lens, d["C"], d["Hk"], d["D"]),
                "v_cache": _ragged_cache(g, kv_lens, d["C"], d["Hk"], d["D"]), "kv_lens": kv_lens,
                "scale": d["D"] ** -0.5}
    elif c.op == "kv_write":
        cache_shape = (b, d["C"], d["Hk"], d["D"])
        args = {"k_cache": _randn(g, *cache_shape), "v_cache": _randn(g, *cache_shape),
                "k": _randn(g, b, t, d["Hk"], d["D"]), "v": _randn(g, b, t, d["Hk"], d["D"]),
                "slots": _slots(c)}
    elif c.op == "infllm_compress_keys":
        kv_lens = _kv_lens(c)
        args = {"k_cache": _ragged_cache(g, kv_lens, d["C"], d["Hk"], d["D"]), "kv_lens": kv_lens,
                "size": d["W"], "stride": d["R"]}
    elif c.op == "infllm_append_kernel":
        kv_lens = _kv_lens(c)
        count = max(0, (d["C"] - d["W"]) // d["R"] + 1)
        args = {"kernels": _randn(g, b, count, d["Hk"], d["D"]),
                "k_cache": _ragged_cache(g, kv_lens, d["C"], d["Hk"], d["D"]), "kv_lens": kv_lens,
                "size": d["W"], "stride": d["R"]}
    elif c.op == "infllm_select_blocks":
        geo, kv_lens = geometry(c), _kv_lens(c)
        args = {"q": _randn(g, b, t, d["H"], d["D"]),
                "kernels": _kernels(g, kv_lens, d["C"], d["Hk"], d["D"], geo.kernel_size, geo.kernel_stride),
                "coarse": _kernels(g, kv_lens, d["C"], d["Hk"], d["D"], geo.coarse_size, geo.coarse_stride),
                "kv_lens": kv_lens, "geometry": geo, "scale": d["D"] ** -0.5}
    elif c.op == "block_sparse_attention":
        geo, kv_lens = geometry(c), _kv_lens(c)
        args = {"q": _randn(g, b, t, d["H"], d["D"]),
                "k_cache": _ragged_cache(g, kv_lens, d["C"], d["Hk"], d["D"]),
                "v_cache": _ragged_cache(g, kv_lens, d["C"], d["Hk"], d["D"]),
                "blocks": _selected_blocks(g, kv_lens, t, d["Hk"], geo.budget, geo.block_size),
                "kv_lens": kv_lens, "block_size": geo.block_size, "scale": d["D"] ** -0.5}
    elif c.op == "sample":
        logits = _randn(g, b, d["V"], scale=3.0)
        if "ties" in c.flags:
            top = logits.max(dim=-1, keepdim=True).values
            logits[:, d["V"] // 2] = top.squeeze(-1)
            logits[:, d["V"] // 4] = top.squeeze(-1)
        args = {"logits": logits, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "generator": None}
    elif c.op == "lightning_attention":
        h, dim = d["H"], d["D"]
        # random unit k, v leave state entries of std sqrt(1 / (1 - lambda^2)): 1.1 to 11 over these slopes
        state = _randn(g, b, h, dim, dim, scale=3.0) if "state" in c.flags else torch.zeros(b, h, dim, dim)
        args = {"q": _randn(g, b, t, h, dim), "k": _randn(g, b, t, h, dim), "v": _randn(g, b, t, h, dim),
                "slopes": sala_slopes(h), "state": state, "scale": dim ** -0.5}
    else:
        raise KeyError(f"no input recipe for op {c.op!r}")
    dtype = TORCH_DTYPE[c.dtype]

    def rounded(k: str, v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in FLOAT32_ARGS:
            return v.to(dtype).float()
        return v

    return {k: rounded(k, v) for k, v in args.items()}


def _place(args: dict[str, Any], dtype: torch.dtype | None, device: torch.device) -> dict[str, Any]:
    """Move tensors to ``device``; float tensors to ``dtype`` (None keeps float32), except the
    float32-by-contract ones (:data:`FLOAT32_ARGS`)."""
    out = {}
    for k, v in args.items():
        if isinstance(v, quant.QuantizedWeight):
            v = v.to(device)  # float32 scales by contract: the container is never rounded
        elif isinstance(v, torch.Tensor):
            if v.is_floating_point() and dtype is not None and k not in FLOAT32_ARGS:
                v = v.to(dtype)
            v = v.to(device)
        out[k] = v
    return out


# -- the metric --------------------------------------------------------------------------------

def nmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``sum((ref - out)^2) / sum(ref^2)`` in float64; inf when NaN appears in ``out`` (but not in
    ``ref``) or an infinity has the wrong sign; 0 for two all-zero tensors."""
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {list(ref.shape)} vs output {list(out.shape)}")
    r = ref.detach().double().cpu()
    o = out.detach().double().cpu()
    if bool(torch.isnan(o).ne(torch.isnan(r)).any()):
        return math.inf
    both_inf = torch.isinf(r) | torch.isinf(o)
    if bool((r[both_inf] != o[both_inf]).any()):
        return math.inf
    finite = ~(both_inf | torch.isnan(r))
    r, o = r[finite], o[finite]
    den = float((r * r).sum())
    num = float(((r - o) ** 2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def max_abs(ref: torch.Tensor, out: torch.Tensor) -> float:
    diff = (ref.detach().double().cpu() - out.detach().double().cpu()).abs()
    diff = diff[~torch.isnan(diff)]
    return float(diff.max()) if diff.numel() else 0.0


@dataclass
class CaseResult:
    """status: ``ok`` | ``FAIL`` | ``not supported`` | ``error``. error: the NMSE (or mismatch
    fraction for ids) of the output with the largest error relative to its own tolerance;
    output: which output it was; tolerance: that output's bound (``OpSpec.tolerance``)."""

    case: Case
    impl: str
    status: str
    error: float = float("nan")
    tolerance: float = float("nan")
    max_abs: float = float("nan")
    output: str = ""
    reason: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status in ("ok", "not supported")

    def line(self) -> str:
        head = f"{self.case.label} [{self.impl}]: "
        if self.status == "ok":
            return head + f"OK (NMSE {self.error:.2e} <= {self.tolerance:.0e})"
        if self.status == "FAIL":
            return head + (f"FAIL {self.output}: NMSE {self.error:.2e} > {self.tolerance:.0e} "
                           f"(max_abs {self.max_abs:.2e})")
        return head + f"{self.status} [{self.reason}]"

    def as_dict(self) -> dict[str, Any]:
        return {"op": self.case.op, "case": self.case.label, "impl": self.impl, "dtype": self.case.dtype,
                "status": self.status, "nmse": self.error, "tolerance": self.tolerance,
                "max_abs": self.max_abs, "output": self.output, "reason": self.reason}


def reference_fn(op: str) -> Callable[..., Any]:
    """The float32 reference implementation of ``op`` (the judge)."""
    ref = next(i for i in implementations(op, "cpu") if i.name == "reference")
    return ref.load()


def _outputs(op: str, value: Any, args: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The op's named outputs: its return value, or for an in-place op the written arguments."""
    spec = get_spec(op)
    names = list(spec.outputs)
    if spec.inplace:
        if value is not None:
            raise ValueError(f"{op} is in place and must return None, got {type(value).__name__}")
        return {name: args[name] for name in names}
    values = value if isinstance(value, tuple) else (value,)
    if len(values) != len(names):
        raise ValueError(f"{op} returned {len(values)} outputs, the catalogue declares {len(names)}: {names}")
    return dict(zip(names, values))


def check(c: Case, fn: Callable[..., Any], impl: str = "impl", device: str = "cpu",
          ref_fn: Callable[..., Any] | None = None, seed: int = 0,
          prepare: Callable[..., Any] | None = None) -> CaseResult:
    """Run ``fn`` on the case's inputs (on ``device``, in ``c.dtype``) and the reference on the
    float32 upcast; compare every output with the op's tolerance. ``prepare``: the implementation's
    bind-time weight repacking (``Impl.prepare``), applied to the ``weight`` argument first. Never
    raises for a failing implementation: an exception becomes status ``error`` with its first line."""
    spec = get_spec(c.op)
    tolerance = spec.tolerance(c.dtype)
    args = make_inputs(c, seed)
    started = time.perf_counter()
    ref_args = _place(args, None, torch.device("cpu"))
    if get_spec(c.op).inplace:
        ref_args = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in ref_args.items()}
    ref = _outputs(c.op, (ref_fn or reference_fn(c.op))(**ref_args), ref_args)
    dev = torch_device(device)  # the emulated NPU keeps tensors on the CPU
    try:
        placed = _place(args, TORCH_DTYPE[c.dtype], dev)
        if prepare is not None:
            placed["weight"] = prepare(placed["weight"], c.context(device))
        if get_spec(c.op).inplace:
            placed = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in placed.items()}
        out = _outputs(c.op, fn(**placed), placed)
    except Exception as exc:  # noqa: BLE001 - a broken implementation is a result, not a crash
        first = (str(exc).strip().splitlines() or [""])[0]
        return CaseResult(c, impl, "error", tolerance=tolerance, reason=f"{type(exc).__name__}: {first}")
    worst, worst_ratio = None, -1.0
    for name, r in ref.items():
        o = out[name]
        if tuple(o.shape) != tuple(r.shape):
            return CaseResult(c, impl, "FAIL", math.inf, tolerance, math.inf, name,
                              f"shape {list(o.shape)}, expected {list(r.shape)}")
        if not r.is_floating_point():
            err = float((o.cpu() != r).double().mean()) if r.numel() else 0.0
        else:
            err = nmse(r, o)
        bound = spec.tolerance(c.dtype, name)
        ratio = err / bound if bound else (math.inf if err else 0.0)
        if ratio > worst_ratio:  # report the output furthest over (or closest to) its own bound
            worst, worst_ratio = (name, err, bound, max_abs(r.double(), o.double())), ratio
    name, err, bound, worst_abs = worst
    status = "ok" if worst_ratio <= 1.0 else "FAIL"
    return CaseResult(c, impl, status, err, bound, worst_abs, name, seconds=time.perf_counter() - started)


def check_impl(c: Case, impl: Impl, device: str | None = None, seed: int = 0) -> CaseResult:
    """:func:`check` for a registered implementation, asking its ``supports()`` first."""
    device = device or impl.backend
    reason = impl.supports(c.context(device))
    if reason is not None:
        return CaseResult(c, impl.qualname, "not supported", reason=reason)
    return check(c, impl.load(), impl.qualname, device, seed=seed, prepare=impl.load_prepare())
