"""Decode steps replayed from a device graph (CUDA graph, Ascend ``NPUGraph``) instead of being
launched op by op: at batch 1 a small model's decode step is mostly host and launch overhead,
which a replay removes (one launch per step instead of ~15 per layer).

What the graph holds fixed, and how each step still differs:

* The ops are bound with ``capture=GRAPH_OPS``: only ``capturable`` implementations (no host
  read of tensor values). On the NPU, decode attention stays the fused kernel (FIA), which takes
  each row's length as a host list: the graph is captured with ``auto_dispatch_capture=True``
  (the lengths of the captured step come from :func:`hal.graphs.host_kv_lens`) and
  ``NPUGraph.update`` gives every captured FIA call the step's lengths before each replay
  (``GraphRuntime.refresh``). Where FIA does not apply (float32, other head dims, a runtime
  without updates, CUDA), attention reads the whole cache capacity C with a per-row mask
  (``torch_full``): its cost grows with C, the prompt plus ``max_new_tokens`` (rounded up to 128).
* Per step the host plans the step as eager decode does (``KVCache.plan``: slots, lengths,
  capacity check) and one copy moves (token, slot, length) per row into the graph's input
  buffer; then the lengths refresh and ``replay()``. The positions are the slots (each row's
  real tokens start at 0).
* Tensor parallel (``model/tp.py``): the step's all_reduce / all_gather calls are captured with the
  rest. CUDA graphs capture NCCL collectives (NCCL >= 2.9.6), so ``cuda`` replays them; capturing
  HCCL collectives in an NPUGraph is not supported here (refused, with that reason). Neither is
  verified on hardware yet.
* The graph belongs to one :class:`~model.cache.KVCache` (the addresses of its buffers) and its
  batch size. It is captured on the first step, after a warm-up run of the same step. A model
  with InfLLM-v2 gets a second graph, captured on the first step past ``dense_len`` (the
  host knows the lengths, so it picks the graph; the sparse ops are capturable too).
"""
from __future__ import annotations

import torch

from hal.errors import InputError, UnsupportedOpError
from hal.graphs import GraphRuntime, graph_runtime, host_kv_lens
from hal.registry import bind
from model.cache import KVCache
from model.minicpm import PreparedLinear

GRAPH_OPS = frozenset(("embedding", "rms_norm", "add_rms_norm", "rotary", "swiglu", "linear", "logits",
                       "kv_write", "attention_decode", "infllm_append_kernel", "infllm_select_blocks",
                       "block_sparse_attention", "lightning_attention", "sigmoid_gate",
                       "linear_int4", "linear_int8", "linear_ternary"))
"""The ops a decode step calls; each must be served by a ``capturable`` implementation. The quantized
linears also by the implementation bound at load: their weights are in its prepared layout."""

_TOKEN, _SLOT, _LENGTH = range(3)


class DecodeGraph:
    """One captured decode step (one new token per row) of ``model`` into ``cache``.

    Use after the prompt went through ``model.forward(ids, cache=cache, kv_start=...)``; then
    ``logits = graph.step(tokens)`` once per new token. kv_start: `[B]` left padding of each row
    (as given to forward), or None.

    Raises DeviceUnavailable when the model's device has no graphs (cpu), UnsupportedOpError
    when an op in :data:`GRAPH_OPS` has no capturable implementation there.
    """

    def __init__(self, model, cache: KVCache, kv_start: torch.Tensor | None = None):
        context = model.ops.context
        self.runtime: GraphRuntime = graph_runtime(context.device)
        if model.tp.size > 1 and context.device != "cuda":
            raise UnsupportedOpError(f"decode graph with {model.tp.describe()} on {context.device}: only CUDA graphs "
                                     "capture the collectives (NCCL); run without --decode-graph")
        self.ops = bind(context.device, context.dtype, context.shapes, capture=GRAPH_OPS,
                        graph_updates=self.runtime.updatable)
        for layer in model.layers:
            for linear in vars(layer).values():
                if isinstance(linear, PreparedLinear) and self.ops.record[linear.op].impl != linear.impl:
                    raise UnsupportedOpError(
                        f"decode graph: {linear.op} was prepared for {linear.impl} at load, which the graph cannot "
                        f"capture (it binds {self.ops.record[linear.op].impl}, another weight layout); "
                        "run without --decode-graph")
        self.model = model
        self.cache = cache
        self.kv_start = None if kv_start is None else kv_start.to("cpu", torch.int64)
        model.rope.ensure(cache.capacity)
        # the graph reads these tables by address: keep them alive even if a later forward grows new ones
        self._rope_tables = (model.rope._cos, model.rope._sin)
        self._host = torch.zeros(cache.batch, 3, dtype=torch.int64)
        self._inputs = torch.zeros(cache.batch, 3, dtype=torch.int64, device=model.device)
        self._graphs: dict[bool, tuple[object, torch.Tensor]] = {}  # sparse? -> (graph, logits buffer)

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    @property
    def bound_ops(self) -> dict[str, str]:
        """Op name -> implementation inside the graph (``attention_decode -> npu.torch_full``, ...)."""
        return {op: self.ops.record[op].impl for op in sorted(GRAPH_OPS)}

    @property
    def mode(self) -> str:
        """One line for reports: the graph runtime, how it is captured and what attention serves."""
        mode = f"{self.runtime.name}; {self.runtime.mode}; attention_decode -> {self.bound_ops['attention_decode']}"
        if self.model.tp.size > 1:
            mode += f"; {self.model.tp.describe()}: all_reduce / all_gather captured in the graph"
        return mode

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: `[B]` int64, each row's newest token -> its next-token logits `[B, V]` float32.

        The result is the graph's output buffer: read (or copy) it before the next step."""
        if tokens.shape != (self.cache.batch,):
            raise InputError(f"DecodeGraph.step: tokens must be [{self.cache.batch}], got {list(tokens.shape)}")
        slots, kv_lens = self.cache.plan(1, self.kv_start)
        self._host[:, _TOKEN] = tokens.to("cpu", torch.int64)
        self._host[:, _SLOT] = slots[:, 0]
        self._host[:, _LENGTH] = kv_lens
        self._inputs.copy_(self._host)
        sparse = self.model.config.sparse
        mode = sparse is not None and sparse.applies(int(kv_lens.max()))
        lengths = [int(n) for n in kv_lens.tolist()]
        if mode not in self._graphs:
            self._graphs[mode] = self._capture(mode, lengths)
        graph, logits = self._graphs[mode]
        self.runtime.refresh(graph, lengths)
        graph.replay()
        self.cache.advance(1)
        return logits[:, -1]

    def _step_body(self, sparse: bool) -> torch.Tensor:
        """The captured work: reads only the input buffer, the weights and the cache."""
        slots = self._inputs[:, _SLOT:_SLOT + 1]
        out = self.model.run(self.ops, self._inputs[:, _TOKEN:_TOKEN + 1], self.model.rope.lookup(slots),
                             self.cache, None, True, slots, self._inputs[:, _LENGTH], logits_last_only=True,
                             sparse=sparse)
        return out.logits

    def _capture(self, sparse: bool, lengths: list[int]) -> tuple[object, torch.Tensor]:
        # Warm-up (and the emulated capture) run the step on the inputs of the first replay: their
        # KV writes are the ones the replay makes again, but a lightning state would advance
        # once per run, so those states are put back before the first replay.
        with torch.inference_mode():
            saved = {i: state.clone() for i, state in self.cache.states.items()}
            try:
                with host_kv_lens(lengths):  # the captured step's lengths, for FIA's host arguments
                    self.runtime.warm_up(lambda: self._step_body(sparse))
                    graph = self.runtime.new_graph()
                    with self.runtime.capture(graph):
                        logits = self._step_body(sparse)
            finally:  # also when capture fails: a caller falling back to eager decode needs them intact
                for i, state in saved.items():
                    self.cache.states[i].copy_(state)
        return graph, logits
