"""The CPU decode step without the eager path's per-step overhead: one new token per row through
the same layers (:meth:`MiniCPMForCausalLM.run`, so the layer code exists once), with the
host work done once per step instead of per forward or per layer.

What differs from ``model.forward(tokens[:, None], cache=cache, kv_start=...)`` (the eager path,
which tests/test_fast_decode.py holds it equal to: logits, greedy tokens and cache contents):

* The cache is checked against the model once (at construction), the rotary tables are made to
  cover the whole cache once, and per step the positions are the slots ``KVCache.plan`` gives
  (each row's real tokens start at slot 0, so a decode token's position is its slot): no
  position arithmetic and no table-length read per step.
* Three ops are bound to their ``cpu.decode`` variants (``backends/cpu/decode.py``; same
  arithmetic, bitwise the same values): ``kv_write`` reads the slots on the host (free on the
  CPU) and stores with a copy into the slot's view (one shared slot, as in every batch-1 step)
  or one ``index_put_`` per cache instead of the ~20 calls that avoid that read; ``rotary``
  (a ``RotaryStep`` per step object) derives its tables once per step, not per layer (cos and a
  pre-signed sin ``[-sin_lo | sin_hi]``, `[B, 1, 1, D]`), swaps the halves with one ``roll``
  instead of chunk, neg and cat, and rotates q and k in one pass where they are views of one
  qkv output; ``attention_decode``, over a bfloat16 / float16 cache only (a ``Float32Cache``
  per step object), keeps float32 copies of the cache buffers across steps and converts only
  the positions written since its last call, instead of converting the first max(kv_lens)
  positions of both buffers in every layer of every step (its float32 attention reads them).
  The copies are forgotten whenever the cache's length is not where the last step left it
  (written by ``model.forward``, or rewound). A variant with such state is listed in the decode
  module's ``PER_STEP`` and bound as a fresh instance per step object.
* What was measured and left alone (benchmarks/RESULTS.md): a composed float32 rms_norm (fewer
  nested aten calls than ``F.rms_norm`` but more Python-level ones: no gain); calling the flash
  SDPA kernel directly; planning the step's slots outside ``KVCache.plan`` (13 us per step).

Measured on SmolLM2-135M (float32 and int4, 2 threads) in benchmarks/RESULTS.md ("CPU decode
(issue 13)"). ``torch.compile`` of the step was measured too and is not used: see that section.

Cuda and npu models use decode graphs instead (``model/decode_graph.py``).
"""
from __future__ import annotations

import importlib

import torch

from hal.errors import DeviceUnavailable, InputError
from hal.registry import Binding, BoundOps, implementations
from model.cache import KVCache

FAST_OPS = ("kv_write", "rotary", "attention_decode")
"""The ops the step binds to their ``cpu.decode`` variant (where the model has ``cpu.torch``;
attention_decode only over a bfloat16 / float16 cache: a float32 one needs no float32 copies)."""


def decode_ops(ops: BoundOps, float32_cache: bool = True) -> BoundOps:
    """``ops`` with each of :data:`FAST_OPS` served by ``cpu.decode`` where ``ops`` binds it to
    ``cpu.torch`` (attention_decode only when ``float32_cache`` is False) and the caller did not
    choose ``cpu.torch`` with ``prefer=`` (:attr:`Binding.preferred`); overrides, the
    reference and other backends' ops are kept as they are. A variant the decode module lists
    in its ``PER_STEP`` is bound as a fresh instance of its class (state of this step object)."""
    swaps = {}
    for op in FAST_OPS:
        bound = ops.record[op]
        if bound.impl != "cpu.torch" or bound.preferred or (op == "attention_decode" and float32_cache):
            continue  # preferred: the caller chose cpu.torch with prefer= (e.g. no float32 KV copies)
        impl = next(i for i in implementations(op, "cpu") if i.name == "decode")
        fn = impl.load()
        per_step = getattr(importlib.import_module(fn.__module__), "PER_STEP", {})
        swaps[op] = (per_step[fn]() if fn in per_step else fn,
                     Binding(op, impl.qualname, False, (("cpu.torch", "the fast decode step binds cpu.decode"),)))
    return ops.with_impls(swaps)


class DecodeStep:
    """Decode steps of ``model`` (on the CPU) into ``cache``, after the prompt went through
    ``model.forward(ids, cache=cache, kv_start=kv_start)``; then ``logits = step(tokens)`` once
    per new token. kv_start: `[B]` left padding of each row (as given to forward), or None.
    compiled: run the decoder layers as one AOTInductor call per step (``model/compiled_decode.py``;
    batch 1, dense attention; built on the first step when not cached; logits within the bounds of
    ``hal/ops.py`` of the eager step's, not always bitwise); False: the layers' ops one by one.

    Raises DeviceUnavailable for a model that is not on the CPU (and, compiled, when the layer
    cannot be traced or built), InputError for a cache that was not made for the model or a
    ``compiled=True`` it cannot serve (the reason named)."""

    def __init__(self, model, cache: KVCache, kv_start: torch.Tensor | None = None, compiled: bool = False):
        if model.device.type != "cpu":
            raise DeviceUnavailable(f"the fast decode step runs on the cpu; this model is on {model.device} "
                                    "(decode_graph=True replays decode steps there)")
        model._check_cache(cache)
        self.model = model
        self.cache = cache
        self.kv_start = None if kv_start is None else kv_start.to("cpu", torch.int64)
        keys = next((t for t in cache.keys if t is not None), None)
        self.ops = decode_ops(model.ops, keys is None or keys.dtype == torch.float32)
        self._length = None  # the cache's length after the last step (else it was written elsewhere)
        model.rope.ensure(cache.capacity)
        self.layers = None  # compiled=True: the decoder layers as one AOTInductor call
        if compiled:
            from model.compiled_decode import CompiledCodesLogits, CompiledLayers, unsupported

            reason = unsupported(model, cache, kv_start)
            if reason is not None:
                raise InputError(f"DecodeStep(compiled=True): {reason}")
            self.layers = CompiledLayers(model, model.ops, cache)
            if CompiledCodesLogits.serves(model):  # a token table kept as codes, no packed copy
                self.ops = self.ops.with_impls({"logits": (CompiledCodesLogits(self.ops.logits), Binding(
                    "logits", "compiled.codes_logits", False, (("cpu.torch", "compiled=True: the codes' package"),)))})

    @property
    def bound_ops(self) -> dict[str, str]:
        """Op name -> implementation serving it in the step (``kv_write -> cpu.decode``, ...)."""
        return {op: b.impl for op, b in self.ops.record.items()}

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: `[B]` int64, each row's newest token -> its next-token logits `[B, V]` float32."""
        if tokens.shape != (self.cache.batch,):
            raise InputError(f"DecodeStep.step: tokens must be [{self.cache.batch}], got {list(tokens.shape)}")
        model = self.model
        if self.cache.length != self._length:  # written elsewhere (the prompt's forward, a rewind)
            forget = getattr(self.ops.attention_decode, "forget", None)
            if forget is not None:
                forget()
        slots, kv_lens = self.cache.plan(1, self.kv_start)
        sparse = model.config.sparse
        use_sparse = sparse is not None and sparse.applies(int(kv_lens.max()))
        rope = model.rope.lookup(slots)
        runner = self.layers if self.layers is not None and self.layers.begin(rope, int(kv_lens[0])) else None
        out = model.run(self.ops, tokens[:, None], rope, self.cache, None, True, slots,
                        kv_lens, logits_last_only=True, sparse=use_sparse, layers_runner=runner)
        self.cache.advance(1)
        self._length = self.cache.length
        return out.logits[:, -1]
