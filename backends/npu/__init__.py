"""Ascend NPU backend: torch_npu fused ops behind the op catalogue (data only; torch_npu is
imported when an op first runs, see ``runtime.py``).

op                 implementation      torch_npu op
embedding          npu.torch           (F.embedding on the NPU)
rms_norm           npu.torch_npu       npu_rms_norm
add_rms_norm       npu.torch_npu       npu_add_rms_norm (branch scaled first)
rotary             npu.torch_npu       npu_rotary_mul ('half', float32)
swiglu             npu.torch_npu       npu_swiglu ([gate, up])
linear             npu.torch           (F.linear on the NPU)
logits             npu.torch           (float32 GEMM over upcast vocabulary chunks, portable torch)
attention_prefill  npu.torch_npu       npu_fused_infer_attention_score (TND, sparse_mode=3; head dim 128/192)
                   npu.torch_npu_bsnd  FIA in BSND (other head dims that are multiples of 16, e.g. 64)
                   npu.torch           float32 / other head dims
attention_decode   npu.torch_npu       FIA (TND) with block_table over the cache's 128-token page view
                   npu.torch_npu_bsnd  the same in BSND
                   npu.torch           float32 / other head dims
                   npu.torch_full      in a decode graph when FIA does not apply (whole capacity)
kv_write           npu.torch_npu       npu_scatter_pa_kv_cache on the same page view
                   npu.torch           float32 and decode graphs (index_put_, portable torch)
lightning_attention npu.torch          (chunked Simple GLA in plain torch: torch_npu has no lightning op)
sample             npu.torch_npu       npu_top_k_top_p + exponential race
linear_int4        npu.torch_npu       npu_convert_weight_to_int4pack + npu_weight_quant_batchmatmul
linear_int8        npu.torch_npu       npu_weight_quant_batchmatmul (per channel / per group)
linear_ternary     npu.torch_unpack    2-bit codes unpacked to x's dtype on the device, then F.linear
                   npu.dequant         (all three) the container decoded once to a dense weight
infllm_*, block_sparse_attention  npu.torch  (portable torch: no torch_npu op fits InfLLM's 64-token
                                              blocks with causal masking inside them)

Every implementation but FIA prefill, npu_scatter_pa_kv_cache (host lengths / slots filtered on
the host) and sampling is ``capturable`` inside an NPUGraph (decode graphs,
``model/decode_graph.py``); FIA decode only in a graph captured with ``auto_dispatch_capture``
whose kv lengths ``NPUGraph.update`` refreshes before each replay (``graph_update``). With ``HAL_NPU_EMULATE=1`` the same code runs against
``backends/npu/emulator`` on CPU tensors.
"""
from __future__ import annotations

from backends.cpu import register_dequantized, torch_fn
from backends.npu import supports
from hal.registry import Impl, register

_M = "backends.npu"

_CAPTURABLE = dict(capturable=True)

register(Impl("embedding", "npu", "torch", f"{_M}.dense:embedding_npu", **_CAPTURABLE))
register(Impl("rms_norm", "npu", "torch_npu", f"{_M}.norm:rms_norm_npu", **_CAPTURABLE))
register(Impl("add_rms_norm", "npu", "torch_npu", f"{_M}.norm:add_rms_norm_npu", **_CAPTURABLE))
register(Impl("rotary", "npu", "torch_npu", f"{_M}.rotary:rotary_npu", supports=supports.rotary,
              **_CAPTURABLE))
register(Impl("swiglu", "npu", "torch_npu", f"{_M}.swiglu:swiglu_npu", **_CAPTURABLE))
register(Impl("linear", "npu", "torch", f"{_M}.dense:linear_npu", **_CAPTURABLE))
register(Impl("logits", "npu", "torch", "backends.cpu.ops:logits_cpu", **_CAPTURABLE))
# FIA: TND for the head dims its docs give (128, 192), BSND for the others (64 among them); the decode
# calls capture in an NPUGraph whose host lengths are refreshed before each replay (graph_update)
for _op in ("attention_prefill", "attention_decode"):
    _graph = dict(capturable=True, graph_update=True) if _op == "attention_decode" else {}
    register(Impl(_op, "npu", "torch_npu", f"{_M}.attention:{_op}_npu",
                  supports=supports.fused_attention(_op, "TND"), priority=0, **_graph))
    register(Impl(_op, "npu", "torch_npu_bsnd", f"{_M}.attention:{_op}_npu_bsnd",
                  supports=supports.fused_attention(_op, "BSND"), priority=1, **_graph))
    register(Impl(_op, "npu", "torch", f"{_M}.attention_torch:{_op}_npu_torch", priority=10))
register(Impl("attention_decode", "npu", "torch_full", f"{_M}.attention_torch:attention_decode_full_npu_torch",
              priority=20, **_CAPTURABLE))
register(Impl("kv_write", "npu", "torch_npu", f"{_M}.attention:kv_write_npu", supports=supports.kv_write,
              priority=0))
register(Impl("kv_write", "npu", "torch", "backends.cpu.ops:kv_write_cpu", priority=10, **_CAPTURABLE))
register(Impl("sample", "npu", "torch_npu", f"{_M}.sample:sample_npu"))
# InfLLM-v2: no torch_npu op fits (npu_block_sparse_attention has no causal mask inside a block and
# needs 128-token KV blocks; InfLLM uses 64), so the portable torch code runs on the NPU
# (lightning_attention: torch_npu has no lightning op either; sigmoid_gate: plain elementwise torch)
for _op in ("infllm_compress_keys", "infllm_append_kernel", "infllm_select_blocks", "block_sparse_attention",
            "lightning_attention", "sigmoid_gate"):
    register(Impl(_op, "npu", "torch", torch_fn(_op), **_CAPTURABLE))

# weight-only quantized linears: int4 / int8 through npu_weight_quant_batchmatmul (repacked once at
# bind time), ternary unpacked from its 2-bit codes on the device (torch_npu has no 2-bit op)
for _op in ("linear_int4", "linear_int8"):
    register(Impl(_op, "npu", "torch_npu", f"{_M}.quant_linear:linear_weight_quant_npu",
                  supports=supports.weight_quant(_op), prepare=f"{_M}.quant_linear:prepare_weight_quant",
                  **_CAPTURABLE))
register(Impl("linear_ternary", "npu", "torch_unpack", f"{_M}.quant_linear:linear_ternary_npu",
              prepare=f"{_M}.quant_linear:prepare_packed_ternary", **_CAPTURABLE))
register_dequantized("npu")
