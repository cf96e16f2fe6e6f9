"""The CPU decode step's decoder layers compiled ahead of time with AOTInductor (opt-in:
``DecodeStep(model, cache, compiled=True)``, ``generate(..., compiled=True)``).

Why: at 135M parameters a float32 decode token spends ~8 ms of ~34 outside the matrix products
(benchmarks/RESULTS.md, "CPU decode (issue 13)"), and most of it is not arithmetic: a small torch
op right after a large matrix product costs 2-3x what it costs in a loop of its own (35-42 us
instead of 14 for add_rms_norm; the product's code and data push the dispatcher's out of the
caches), and a layer makes ~180 such calls. ``torch.compile`` per region adds more in guards and
Python wrappers than it saves (measured: 34-105 us per compiled add_rms_norm call). An
AOTInductor package called through its C++ runner costs 3-16 us per call and runs every layer of
the step, matrix products included, as one call of generated C++ (float32 products as the
reductions that ``cpu.onednn``'s linear is traced as, fused by inductor, or ``cpu.torch_kn``'s GEMM
where that binds; bfloat16 ones through the GEMM; int4 through torch's int4 kernel).

What is compiled: :meth:`MiniCPMForCausalLM.decoder_layer` itself (so the layer code exists
once), called for each layer in turn (:class:`_Stack`), traced by ``torch.export`` with the
model's bound ops, except the two cache ops, which read the step's length from the shape of the
cache views they are given instead of from ``slots`` / ``kv_lens`` on the host: ``kv_write``
stores into the last position of the views (the slot of a batch-1 decode token: ``slot = kv_len -
1``) and ``attention_decode`` attends over the whole views, as ``cpu.decode``'s
:func:`~backends.cpu.decode.kv_write_decode_cpu` and :func:`~backends.cpu.ops.attention_decode_cpu`
do for one row (through the SDPA call, or on AVX-512 CPUs as :func:`attention_one_row`, a form
inductor fuses: :data:`ONE_ROW_ATTENTION_ON`). The length is the package's one
dynamic dimension, so one package serves every step (the layers' weights are inputs, not
constants: nothing is copied) and every cache capacity. It is cached on disk under
``$HAL_CACHE_DIR/aoti/``, named by a hash of the exported graph, its input layouts and torch's
version: the first step of a new model shape compiles (10-60 s, a C++ compiler is needed;
34 s for SmolLM2-135M's 30 layers), later ones load it (well under a second).

Values: the package keeps every rounding to bfloat16 / float16 the eager ops make (inductor's
``emulate_precision_casts``; without it, fused intermediates stay float32 and a bfloat16 step's
logits moved by up to 0.18 on the tiny checkpoint); the float32 sums inside fused norms may run
in another order, which can flip a bfloat16 rounding. Measured: on the tiny checkpoint (12 steps)
bfloat16, dense and int4, bitwise the eager step's logits and cache, float32 within 7.5e-6 of
logits of magnitude 15; on SmolLM2-135M int4 the first step's logits within 0.25 of magnitude 33
(NMSE 8.5e-6), greedy tokens equal;
tests/test_compiled_decode.py holds them to the ``logits`` bounds of ``hal/ops.py`` and the
greedy tokens equal. Served: dense attention layers (no
lightning, sparse, output gate or tensor parallel), batch 1 without left padding, on the CPU;
:func:`unsupported` says why not otherwise.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import tempfile
import weakref
from pathlib import Path

import torch

from backends.cpu.ops import _sdpa_masked
from hal import env, quant
from hal.errors import DeviceUnavailable
from hal.registry import Binding, BoundOps
from model.minicpm import LayerWeights, PreparedLinear

LINEARS = ("qkv", "o", "gate_up", "down")
_LOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""model -> (its ops when traced, the loaded package's run, its path): later steps of the same
model skip the export and the load."""
BUILD_OPTIONS = {"emulate_precision_casts": True}
"""inductor's options for the package (part of its cache key): keep every rounding to bfloat16 /
float16 the eager ops make (without it, fused intermediates stay float32)."""
MIN_LENGTH = 2
"""The shortest cache (prompt + the new token) the package serves; a shorter one runs eagerly
(export would otherwise specialise lengths 0 and 1)."""


def unsupported(model, cache, kv_start: torch.Tensor | None) -> str | None:
    """Why the decode layers of ``model`` into ``cache`` cannot be compiled, or None."""
    cfg = model.config
    if model.device.type != "cpu":
        return f"the compiled decode layers run on the cpu; this model is on {model.device}"
    if cache.batch != 1 or (kv_start is not None and bool(kv_start.any())):
        return f"the compiled decode layers serve batch 1 without left padding (batch {cache.batch})"
    if model.lightning_layers or cfg.sparse is not None:
        return "the compiled decode layers serve dense attention layers only (this model has lightning or sparse layers)"
    if model.tp.size > 1:
        return "the compiled decode layers do not serve tensor parallel models"
    if len(set(model.residual_scales)) != 1:
        return "the compiled decode layers need one residual scale for every layer"
    expected = {name: _signature(getattr(model.layers[0], name)) for name in LINEARS}
    for layer in model.layers:
        if layer.mixer != "attention" or layer.o_gate is not None:
            return "the compiled decode layers serve attention layers without an output gate only"
        for name in LINEARS:
            weight = getattr(layer, name)
            if not isinstance(weight, torch.Tensor) and not dataclasses.is_dataclass(getattr(weight, "weight", None)):
                return f"the compiled decode layers cannot take {name}'s prepared layout ({type(weight).__name__})"
            if _signature(weight) != expected[name]:
                return f"the compiled decode layers need every layer's {name} in one layout"
    return None


def _signature(weight) -> tuple:
    """What must agree between layers for one package to serve them: tensor metadata, and the
    non-tensor fields of a prepared container (group size, padding, nibble order...)."""
    if isinstance(weight, torch.Tensor):
        return ("tensor", weight.dtype, tuple(weight.shape), weight.stride())
    inner = weight.weight
    fields = []
    for field in dataclasses.fields(inner):
        value = getattr(inner, field.name)
        fields.append(_signature(value) if isinstance(value, torch.Tensor) else (field.name, id(value)
                      if dataclasses.is_dataclass(value) else value))
    return (weight.op, type(inner).__name__, tuple(fields))


def _tensor_fields(inner) -> list[str]:
    """The names of a prepared container's tensor fields: what the package takes as inputs."""
    return [f.name for f in dataclasses.fields(inner) if isinstance(getattr(inner, f.name), torch.Tensor)]


def _tensors(weight) -> list[torch.Tensor]:
    """The tensors of one linear the package takes as inputs (a container's tensor fields)."""
    if isinstance(weight, torch.Tensor):
        return [weight]
    return [getattr(weight.weight, name) for name in _tensor_fields(weight.weight)]


def _rebuild(template, tensors: list[torch.Tensor]):
    """``template`` (a layer's linear) with its tensors replaced by ``tensors`` (graph inputs)."""
    if isinstance(template, torch.Tensor):
        return tensors[0]
    inner = template.weight
    return dataclasses.replace(template, weight=dataclasses.replace(inner, **dict(zip(_tensor_fields(inner), tensors))))


class _ViewCache:
    """The cache as the traced layer sees it: one layer's key / value views `[1, L, Hk, D]`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values, self.kernels = [keys], [values], {}


def _kv_write_last(k_cache, v_cache, k, v, slots) -> None:
    """kv_write of one token into the last position of the views (its slot, kv_len - 1)."""
    last = k_cache.shape[1] - 1
    k_cache.narrow(1, last, 1).copy_(k)
    v_cache.narrow(1, last, 1).copy_(v)


ONE_ROW_ATTENTION_ON = ("AVX512",)
"""``torch.backends.cpu.get_cpu_capability()`` values where the traced layers attend with
:func:`attention_one_row` instead of the SDPA call. Measured on an Intel Xeon (AVX-512, AMX, 2
threads, SmolLM2-135M's 30 layers, 40 interleaved rounds, median): float32 17.64 -> 17.02 ms per
step at 128 cached tokens, int4 5.63 -> 5.26 (128) and 8.55 -> 8.19 (600); one SDPA call there is
~20 us at 150 keys for ~2 us of arithmetic. An earlier einsum form, on another AVX-512 Xeon (no
AMX) with one package per layer, gave int4 15.18 -> 13.99 ms/token but float32 29.73 -> 31.03
(benchmarks/RESULTS.md). Not measured below AVX-512: the SDPA call stays there."""


def attention_one_row(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """One query row over every cached position, written for inductor to fuse: q `[1, 1, H, D]`,
    k / v `[1, L, Hk, D]` (query head h reads kv head ``h // (H / Hk)``) -> `[1, 1, H, D]` in q's
    dtype; scores, softmax and the weighted sum in float32, rounded once (as ``_sdpa_masked``)."""
    batch, _, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    query = q.float().view(batch, 1, kv_heads, heads // kv_heads, dim)
    scores = (query * k_cache.float().unsqueeze(3)).sum(-1) * scale  # [1, L, Hk, H / Hk]
    weights = torch.softmax(scores, dim=1)
    out = (weights.unsqueeze(-1) * v_cache.float().unsqueeze(3)).sum(1)  # [1, Hk, H / Hk, D]
    return out.reshape(batch, 1, heads, dim).to(q.dtype)


def _attention_views(q, k_cache, v_cache, kv_lens, scale):
    """attention_decode of one row over the whole views (their length is the row's kv_len)."""
    if torch.backends.cpu.get_cpu_capability() in ONE_ROW_ATTENTION_ON:
        return attention_one_row(q, k_cache, v_cache, scale)
    return _sdpa_masked(q, k_cache, v_cache, None, False, scale)


class _Layer(torch.nn.Module):
    """:meth:`decoder_layer` with a layer's tensors as inputs: x, residual `[1, 1, E]`, the linears'
    tensors, post_norm, next_norm `[E]`, cos / sin `[1, 1, D]`, keys / values `[1, L, Hk, D]`."""

    def __init__(self, model, ops: BoundOps):
        super().__init__()
        self.model, self.ops = model, ops
        self.template = model.layers[0]
        self.counts = [len(_tensors(getattr(self.template, name))) for name in LINEARS]

    def forward(self, x, residual, post_norm, next_norm, cos, sin, keys, values, *linears):
        weights, at = {}, 0
        for name, count in zip(LINEARS, self.counts):
            weights[name] = _rebuild(getattr(self.template, name), list(linears[at:at + count]))
            at += count
        layer = LayerWeights("attention", None, weights["qkv"], weights["o"], post_norm, weights["gate_up"],
                             weights["down"])
        return self.model.decoder_layer(self.ops, 0, layer, x, residual, next_norm, cos, sin,
                                        _ViewCache(keys, values), None, True, None, None, False, None)


PER_LAYER_FIXED = 4
"""post_norm, next_norm, keys, values: the per-layer inputs of :class:`_Stack` before the linears."""


class _Stack(torch.nn.Module):
    """Every decoder layer of the step, one :class:`_Layer` after another: x, residual `[1, 1, E]`,
    cos / sin `[1, 1, D]`, then per layer ``post_norm, next_norm, keys, values, *linears``
    (:data:`PER_LAYER_FIXED` + the linears' tensors) -> the final norm's input and residual."""

    def __init__(self, model, ops: BoundOps):
        super().__init__()
        self.layer = _Layer(model, ops)
        self.count = len(model.layers)
        self.width = PER_LAYER_FIXED + sum(self.layer.counts)

    def forward(self, x, residual, cos, sin, *per_layer):
        for index in range(self.count):
            post_norm, next_norm, keys, values, *linears = per_layer[index * self.width:(index + 1) * self.width]
            x, residual = self.layer(x, residual, post_norm, next_norm, cos, sin, keys, values, *linears)
        return x, residual


class CompiledLayers:
    """The ``layers_runner`` of :meth:`MiniCPMForCausalLM.run` for one decode step object: all
    decoder layers as one call of the AOTInductor package (:class:`_Stack`); :meth:`begin` gives
    the step's cos / sin and length.

    One package for the whole stack rather than one per layer: the same kernels (inductor emits
    each distinct loop once), but one call per step instead of one per layer. Measured on
    SmolLM2-135M (30 layers, float32, Intel Xeon AVX-512, 2 threads): the 30 layers 17.55 -> 16.85
    ms per step, bitwise the same outputs; the build 34 s instead of ~10 (once per model shape)."""

    def __init__(self, model, ops: BoundOps, cache, progress=sys.stderr):
        self.model, self.cache = model, cache
        self.ops = ops.with_impls({
            "kv_write": (_kv_write_last, Binding("kv_write", "compiled.kv_write_last", False, ())),
            "attention_decode": (_attention_views, Binding("attention_decode", "compiled.attention_views", False, ())),
        })
        self._run = None
        self._progress = progress
        self.path: Path | None = None
        self._rope = self._length = None
        self._fixed_for: list | None = None  # the layer objects _fixed was made from
        self._fixed: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = []

    def begin(self, rope: tuple[torch.Tensor, torch.Tensor], length: int) -> bool:
        """Set the step's (cos, sin) and cache length after its token; False: too short, run eagerly."""
        self._rope, self._length = rope, length
        return length >= MIN_LENGTH

    def _layer_tensors(self):
        """Per layer (post_norm, next_norm, the linears' tensors), made once per set of layer objects."""
        layers = self.model.layers
        if self._fixed_for is None or any(a is not b for a, b in zip(self._fixed_for, layers)):
            norms = [layer.input_norm for layer in layers[1:]] + [self.model.final_norm]
            self._fixed = [(layer.post_norm, norm, [t for name in LINEARS for t in _tensors(getattr(layer, name))])
                           for layer, norm in zip(layers, norms)]
            self._fixed_for = list(layers)
        return self._fixed

    def __call__(self, x, residual):
        """x (the first layer's normed input), residual `[1, 1, E]` -> the final norm's output and
        the residual after the last layer, as the loop over :meth:`decoder_layer` returns them."""
        cos, sin = self._rope
        inputs = [x, residual, cos, sin]
        for index, (post_norm, next_norm, linears) in enumerate(self._layer_tensors()):
            inputs += [post_norm, next_norm, self.cache.keys[index].narrow(1, 0, self._length),
                       self.cache.values[index].narrow(1, 0, self._length), *linears]
        if self._run is None:
            known = _LOADED.get(self.model)
            if known is not None and known[0] is self.model.ops:
                self._run, self.path = known[1], known[2]
            else:
                self._run = self._load(inputs)
                _LOADED[self.model] = (self.model.ops, self._run, self.path)
        return tuple(self._run(inputs))

    def _load(self, inputs: list[torch.Tensor]):
        stack = _Stack(self.model, self.ops)
        length = torch.export.Dim("kv_len", min=MIN_LENGTH)
        per_layer = [None, None, {1: length}, {1: length}] + [None] * (stack.width - PER_LAYER_FIXED)
        dynamic = [None] * 4 + [tuple(per_layer * stack.count)]  # the last: *per_layer
        positions = tuple(4 + index * stack.width + offset for index in range(stack.count) for offset in (2, 3))
        run, self.path = package(stack, inputs, dynamic, "decoder layers", dynamic_inputs=positions,
                                 progress=self._progress)
        return run


def package(module: torch.nn.Module, inputs: list[torch.Tensor], dynamic, name: str, dynamic_inputs=(),
            progress=sys.stderr):
    """``module`` exported on ``inputs`` (``dynamic``: its ``dynamic_shapes``) and built by
    AOTInductor into ``$HAL_CACHE_DIR/aoti/<name>-<hash>.pt2`` unless that file exists (the hash:
    the exported graph, each input's dtype, shape and strides, torch's version and
    :data:`BUILD_OPTIONS`; ``dynamic_inputs``: positions whose dim 1 is the dynamic length and dim
    0 a batch of 1, whose sizes and dim-0 stride do not count) -> (the runner's ``run``, the path).
    Raises DeviceUnavailable when export or the build fails (no partial file is left)."""
    try:
        program = torch.export.export(module, tuple(inputs), dynamic_shapes=dynamic, strict=False)
    except Exception as error:  # noqa: BLE001 - export names the op it could not trace
        raise DeviceUnavailable(f"compiled decode: torch.export could not trace the {name} "
                                f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    key = hashlib.sha256()
    key.update(repr((torch.__version__, sorted(BUILD_OPTIONS.items()))).encode())
    key.update(program.graph_module.code.encode())
    for position, tensor in enumerate(inputs):
        shape, stride = list(tensor.shape), list(tensor.stride())
        if position in dynamic_inputs:
            shape[1], stride[0] = -1, -1
        key.update(repr((tensor.dtype, shape, stride)).encode())
    folder = env.ensure_cache_dir() / "aoti"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name.replace(' ', '-')}-{key.hexdigest()[:24]}.pt2"
    if not path.exists():
        _build(program, path, name, progress)
    return torch._inductor.aoti_load_package(str(path)).loader.run, path


def _build(program, path: Path, name: str, progress) -> None:
    print(f"[minicpm-hal] compiling the {name} with AOTInductor (once per model shape, 10-60 s) into {path}",
          file=progress, flush=True)
    handle, temporary = tempfile.mkstemp(suffix=".pt2", dir=path.parent, prefix=".partial-")
    os.close(handle)
    try:
        with torch._inductor.config.patch(**BUILD_OPTIONS):
            torch._inductor.aoti_compile_and_package(program, package_path=temporary)
        os.replace(temporary, path)
    except Exception as error:  # noqa: BLE001 - a missing compiler is the usual cause
        raise DeviceUnavailable(f"compiled decode: AOTInductor could not build the {name} (a C++ compiler is "
                                f"needed): {type(error).__name__}: "
                                f"{str(error).splitlines()[0][:200] if str(error) else ''}") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


class _CodesLogits(torch.nn.Module):
    """The ``logits`` of one decode token over a Q8_0-style table held as its codes (``hal.quant``
    ``Int8Weight``: q int8 `[V, E]`, float32 scales `[V, E / group]`, the table being
    ``(q * scale).to(dtype)``): x `[1, 1, E]` float32 -> `[1, 1, V]` float32, each table value
    rounded to ``dtype`` as the dense table holds it, the products summed in float32. Written as a
    reduction (no `[V, E]` temporary), which inductor turns into one pass over the codes."""

    def __init__(self, group: int, dtype: torch.dtype):
        super().__init__()
        self.group, self.dtype = group, dtype

    def forward(self, x, q, scales):
        vocab, width = q.shape
        table = (q.view(vocab, width // self.group, self.group) * scales[..., None]).to(self.dtype).float()
        return (table * x.view(1, width // self.group, self.group)).sum((-1, -2)).view(1, 1, vocab)


class CompiledCodesLogits:
    """``logits`` for the compiled step of a model whose ``logits`` is bound to ``cpu.torch`` over
    a token table kept as Q8_0 codes (``prefer={"logits": "cpu.torch"}``: no packed float16 copy):
    one decode token through an AOTInductor package (:class:`_CodesLogits`); anything else, the
    bound function. Measured on SmolLM2-135M's `[49152, 576]` table: 2.2-2.7 ms per token, about
    cpu.fbgemm's 2.0-2.3 ms over its 56.6 MB copy, against ~14 ms chunk by chunk."""

    def __init__(self, fallback, progress=sys.stderr):
        self.fallback, self._progress = fallback, progress
        self._runs: dict[tuple, object] = {}

    @staticmethod
    def serves(model) -> bool:
        from backends.cpu.table import CodesTable

        table = model.head_weight(model.ops)
        return isinstance(table, CodesTable) and isinstance(table.weight, quant.Int8Weight) \
            and table.weight.scales.dtype == torch.float32

    def __call__(self, x: torch.Tensor, weight) -> torch.Tensor:
        from backends.cpu.table import CodesTable

        if not (isinstance(weight, CodesTable) and isinstance(weight.weight, quant.Int8Weight)
                and tuple(x.shape[:-1]) == (1, 1)):
            return self.fallback(x, weight)
        w = weight.weight
        inputs = [x.float().contiguous(), w.q, w.scales]
        key = (tuple(w.q.shape), w.group_size, weight.dtype)
        run = self._runs.get(key)
        if run is None:
            run, _ = package(_CodesLogits(w.group_size, weight.dtype), inputs, None, "codes logits",
                             progress=self._progress)
            self._runs[key] = run
        return run(inputs)[0]
