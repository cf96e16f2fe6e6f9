"""The op catalogue: every op the model core calls, declared once, as data.

Shape letters (fixed project-wide):
    B batch, T new tokens, S cached/key length, C cache capacity (positions per row, a multiple of
    128 in the model's cache), H query heads, Hk KV heads, D head dim,
    E hidden size, F FFN size, V vocab, N sequences, K (in) / O (out) features of a linear.
Layouts are written ``[B, T, H, D]`` and are contiguous in the last dim unless stated.

Each :class:`OpSpec` names the op, its arguments (with layouts), its outputs, the dtypes the
model may call it with and the NMSE tolerance of an implementation against the float32
reference per dtype. Tolerances live here and nowhere else; tests and the conformance CLI
read them from the spec.

Semantics (what every implementation must compute; the float32 reference in
``backends/cpu/reference/`` is the executable form of these sentences):

``embedding(ids [B, T] int64, weight [V, E]) -> [B, T, E]``
    Row lookup ``weight[ids]``; the μP ``scale_emb`` is applied by the model, not here.

``rms_norm(x [..., E], weight [E], eps) -> [..., E]``
    ``(x.float() * rsqrt(mean(x.float()**2, -1) + eps)).to(x.dtype) * weight``.

``add_rms_norm(x [..., E], residual [..., E], weight [E], eps, scale) -> (y, new_residual)``
    ``new_residual = residual + scale * x`` (in x.dtype) and ``y = rms_norm(new_residual)``.
    The model's scaled residual add (scale = scale_depth / sqrt(L)) fused with the next norm.

``rotary(q [B, T, H, D], k [B, T, Hk, D], cos [B, T, D], sin [B, T, D]) -> (q', k')``
    NeoX ("rotate_half") layout: pairs (i, i + D/2). Computed in float32, returned in the input
    dtype: ``q' = q*cos + rotate_half(q)*sin``. cos/sin carry the LongRoPE factors but not its
    mscale (the model applies mscale**2 to the attention scales, see ``model/rope.py``): float32,
    every value in [-1, 1].

``swiglu(gate [..., F], up [..., F]) -> [..., F]``
    ``silu(gate) * up``.

``sigmoid_gate(x [..., E], gate [..., E]) -> [..., E]``
    ``x * sigmoid(gate)``: the output gates of MiniCPM-SALA's layers (``o_gate``, ``z_proj``).

``linear(x [..., K], weight [O, K]) -> [..., O]``
    ``x @ weight.T``, no bias. The weight may have any strides: a bound implementation's prepare
    may change its layout at load, never its values (``cpu.torch_kn`` holds the `[O, K]` view of a
    `[K, O]` contiguous tensor), so every implementation reads any model's dense weights.

``linear_int4(x [..., K], weight: hal.quant.Int4Weight) -> [..., O]``
``linear_int8(x [..., K], weight: hal.quant.Int8Weight) -> [..., O]``
``linear_ternary(x [..., K], weight: hal.quant.TernaryWeight) -> [..., O]``
    Weight-only quantized linears (activations are not quantized): ``x @ W.T`` with ``W =
    weight.dequantize()`` (the exact float32 decoding of the container, ``hal/quant.py``),
    accumulated in float32 and returned in x's dtype. The op receives what the bound
    implementation's ``prepare`` made of the container at bind time (its own packed layout);
    the reference's prepare is the container's float32 decoding (the reference also takes the
    container itself). The tolerance is against the float32 reference
    on the same container, so the quantization error itself is not the op's.

``logits(x [..., E], weight [V, E]) -> [..., V] float32``
    ``x @ weight.T`` accumulated in float32 and returned in float32, never rounded to the model
    dtype: bf16-rounded logits alone move top-1 probabilities by ~0.5% on average (several %
    at worst), which would hide the accuracy of everything before them.

Quantized token tables (``embedding`` and ``logits`` over a ``hal.quant`` container)
    A GGUF loaded with its quantized tensors kept holds its Q8_0 / Q4_0 / Q4_1 ``token_embd``
    (the types of ``model.gguf_quant.KEPT``; with tied embeddings also the lm_head) as a container `[V, E]`
    (groups along E), not as a dense tensor. Its table is ``W = weight.dequantize().to(dtype)``,
    the dense tensor a dequantizing load holds (``dtype``: the model's), and both ops mean
    exactly what they mean on ``W``, with the same tolerances: the lookup is exact, the logits are
    bf16 x bf16 products summed in float32. As with the quantized linears, the op receives what
    the bound implementation's ``prepare`` made of the container (``model/table.py``): cpu.torch
    its codes (``backends/cpu/table.py``: a lookup decodes its rows, the logits decode chunks of
    rows into a float32 scratch buffer; float32 models decode the table at load), cpu.fbgemm's
    logits its packed float16 form made from the decoded rows, the reference ``W`` itself (its
    float32 decoding in the judge). An implementation without such a prepare (cuda, npu) gets ``W``
    decoded at load: the model then holds it dense.

``attention_prefill(q [B, T, H, D], k [B, T, Hk, D], v [B, T, Hk, D], kv_start [B] int64 | None,
scale) -> [B, T, H, D]``
    Causal grouped-query attention: query head h reads KV head ``h // (H // Hk)``. Query t sees
    key j iff ``kv_start[b] <= j <= t`` (kv_start marks left padding; None means 0). Softmax in
    float32 with ``scale`` (normally ``1/sqrt(D)``). A query that sees no key returns zeros.

``attention_decode(q [B, T, H, D], k_cache [B, C, Hk, D], v_cache [B, C, Hk, D], kv_lens [B] int64,
scale) -> [B, T, H, D]``
    Row b's cached keys/values are positions ``0 .. kv_lens[b]-1`` of its cache row (right-ragged:
    positions ``>= kv_lens[b]`` are unused, may hold anything and must not be read). The T new
    queries are the last T of those positions (their keys are already written, see ``kv_write``):
    query t sees key j iff ``j <= kv_lens[b] - T + t``. A query that sees no key (``kv_lens[b] <
    T``: left padding inside a chunk) returns zeros. T is usually 1 (decode) but any T is valid
    (chunked prefill against a cache). GQA, float32 softmax and ``scale`` as in attention_prefill.
    kv_lens may live on the CPU or on the device.

``kv_write(k_cache [B, C, Hk, D], v_cache [B, C, Hk, D], k [B, T, Hk, D], v [B, T, Hk, D],
slots [B, T] int64) -> None``
    In place: ``k_cache[b, slots[b, t]] = k[b, t]`` and the same for v; ``slots[b, t] == -1``
    skips the token (left padding of a prompt). Written slots of a row are distinct and in
    ``[0, C)``; everything else in the caches is left untouched. Exact: a copy, no arithmetic.

``infllm_compress_keys(k_cache [B, C, Hk, D], kv_lens [B] int64, size, stride) -> [B, N, Hk, D]``
    InfLLM-v2 semantic kernels: kernel j of row b is the mean of keys ``j*stride .. j*stride +
    size - 1`` (float32, rounded once to the key dtype) when that range lies inside the row's
    ``kv_lens[b]`` keys, zeros otherwise. N = ``max(0, (C - size) // stride + 1)``, the kernels
    of a full row (fixed by C, so the shape never depends on data).

``infllm_append_kernel(kernels [B, N, Hk, D], k_cache [B, C, Hk, D], kv_lens [B] int64, size, stride)
-> None``
    In place, the decode-step form of infllm_compress_keys: when row b's ``kv_lens[b]`` keys end
    a kernel (``kv_lens[b] >= size`` and ``(kv_lens[b] - size) % stride == 0``), kernel
    ``(kv_lens[b] - size) // stride`` becomes the mean of keys ``kv_lens[b] - size ..
    kv_lens[b] - 1``; every other kernel is left untouched. O(size) per row instead of O(C).

``infllm_select_blocks(q [B, T, H, D], kernels [B, N1, Hk, D], coarse [B, N2, Hk, D], kv_lens [B],
geometry, scale) -> [B, Hk, T, K] int64``
    InfLLM-v2 block selection (``hal/sparse.py``: geometry; K = geometry.budget). Query t of row b
    sits at position ``p = kv_lens[b] - T + t``; a fine kernel j is visible to it iff complete
    and past (``j*stride + size - 1 <= p``), a coarse one likewise with its own size/stride.
    1. ``lse_h = logsumexp_i(scale * q_h . coarse_i)`` over visible coarse kernels (over the
       visible fine kernels when no coarse one is visible yet).
    2. ``s_j = sum over the H/Hk query heads h of the KV group of exp(scale * q_h . kernels_j -
       lse_h)`` for visible fine kernels j, 0 for the others.
    3. Block c <= ``qb = p // block_size`` scores +inf if ``c < init_blocks`` or ``c >= qb -
       local_blocks``, else ``max_j s_j`` over the fine kernels overlapping block c.
    4. The K highest-scoring blocks among ``0 .. qb`` (all when qb < K; ties: lower index first),
       ascending, then -1 padding. A query with ``p < 0`` selects nothing.
    (research/minicpm4_spec.md §4.4; the v2 code's top-k over all blocks followed by dropping
    future ones selects the same set, future blocks scoring 0 or -inf.)

``block_sparse_attention(q [B, T, H, D], k_cache [B, C, Hk, D], v_cache [B, C, Hk, D],
blocks [B, Hk, T, K] int64, kv_lens [B] int64, block_size, scale) -> [B, T, H, D]``
    attention_decode restricted to selected blocks: query t of row b, head h sees key j iff
    ``j <= kv_lens[b] - T + t`` and ``j // block_size`` is among ``blocks[b, h // (H/Hk), t]``
    (-1 entries are ignored; entries are distinct). A query that sees no key returns zeros.

``lightning_attention(q [B, T, H, D], k [B, T, H, D], v [B, T, H, D], slopes [H] float32,
state [B, H, D, D] float32, scale) -> (o [B, T, H, D], new_state [B, H, D, D] float32)``
    MiniCPM-SALA's lightning layers: linear attention with a constant per-head decay, i.e. fla's
    Simple GLA with ``g_gamma = -slopes`` (the team's SALA spec, sala_spec.md §5.2-5.5: HF
    ``LightningAttention``, fla ``naive_recurrent_simple_gla``). Head h decays by
    ``lambda_h = exp(-slopes[h])`` per token; slopes are the positive ALiBi slopes of SALA's
    ``_build_slope_tensor``. Per row b and head h, token by token from ``S_0 = state[b, h]`` (layout
    ``[D_k, D_v]``): ``S_t = lambda_h * S_{t-1} + outer(k_t, v_t)`` (decay first, then add), then
    ``o_t = (scale * q_t) @ S_t`` (read after the update: the current token has weight 1); no
    normaliser. ``new_state`` is ``S_T``, kept in float32 (never rounded to the model dtype);
    ``state`` itself is not modified. T = 1 is a decode step; T > 1 is a prefill or a
    chunked-prefill chunk continuing from ``state`` (zeros at a sequence's start). No GQA (k, v
    have the query heads) and no padding: every row's T tokens are real tokens. ``o`` has q's
    dtype; scale is normally ``1/sqrt(D)``.

``sample(logits [B, V] float32, temperature, top_k, top_p, generator) -> [B] int64``
    ``temperature == 0`` is greedy (argmax, lowest index on ties). Otherwise divide by the
    temperature, keep the ``top_k`` highest (0 = all) and renormalise, then keep the smallest
    prefix of that distribution whose probability reaches ``top_p`` (1.0 = all; the top token
    is always kept), renormalise and draw one token with ``generator``. (top-k before top-p,
    each on the renormalised survivors: the order of transformers' and vLLM's samplers.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class OpSpec:
    """One op's contract. ``nmse`` maps a dtype name to the largest NMSE
    ``sum((ref - out)^2) / sum(ref^2)`` an implementation may show against the float32
    reference on that dtype's inputs (0.0 = must match exactly); ``output_nmse`` replaces that
    table for the outputs it names. ``inplace``: the op returns None and its ``outputs`` are the
    inputs of the same names as the op left them."""

    name: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    attrs: dict[str, str] = field(default_factory=dict)
    dtypes: tuple[str, ...] = FLOAT_DTYPES
    nmse: dict[str, float] = field(default_factory=dict)
    output_nmse: dict[str, dict[str, float]] = field(default_factory=dict)
    inplace: bool = False

    def tolerance(self, dtype: str, output: str | None = None) -> float:
        """The NMSE bound of ``output`` (default: every output without its own table) on ``dtype``."""
        table = self.output_nmse.get(output, self.nmse)
        if dtype not in table:
            raise KeyError(f"op {self.name}: no NMSE tolerance declared for dtype {dtype}")
        return table[dtype]


# NMSE bounds: float32 implementations may reorder sums (1e-10); bf16/fp16 are bounded by the
# rounding of inputs and outputs to 8 / 11 mantissa bits (unit roundoff^2 ~ 1.5e-5 / 2.4e-7),
# with headroom for accumulation through a softmax or a K-long dot product.
_ELEMENTWISE = {"float32": 1e-10, "bfloat16": 5e-5, "float16": 1e-6}
_REDUCTION = {"float32": 1e-10, "bfloat16": 1e-4, "float16": 2e-6}

EMBEDDING = OpSpec(
    "embedding",
    inputs={"ids": "[B, T] int64", "weight": "[V, E]"},
    outputs={"y": "[B, T, E]"},
    nmse={"float32": 0.0, "bfloat16": 0.0, "float16": 0.0},
)
RMS_NORM = OpSpec(
    "rms_norm",
    inputs={"x": "[..., E]", "weight": "[E]"},
    outputs={"y": "[..., E]"},
    attrs={"eps": "float"},
    nmse=_ELEMENTWISE,
)
ADD_RMS_NORM = OpSpec(
    "add_rms_norm",
    inputs={"x": "[..., E]", "residual": "[..., E]", "weight": "[E]"},
    outputs={"y": "[..., E]", "new_residual": "[..., E]"},
    attrs={"eps": "float", "scale": "float"},
    nmse=_ELEMENTWISE,
)
ROTARY = OpSpec(
    "rotary",
    inputs={"q": "[B, T, H, D]", "k": "[B, T, Hk, D]", "cos": "[B, T, D] f32", "sin": "[B, T, D] f32"},
    outputs={"q": "[B, T, H, D]", "k": "[B, T, Hk, D]"},
    nmse=_ELEMENTWISE,
)
SWIGLU = OpSpec(
    "swiglu",
    inputs={"gate": "[..., F]", "up": "[..., F]"},
    outputs={"y": "[..., F]"},
    nmse=_ELEMENTWISE,
)
SIGMOID_GATE = OpSpec(
    "sigmoid_gate",
    inputs={"x": "[..., E]", "gate": "[..., E]"},
    outputs={"y": "[..., E]"},
    nmse=_ELEMENTWISE,
)
LINEAR = OpSpec(
    "linear",
    inputs={"x": "[..., K]", "weight": "[O, K]"},
    outputs={"y": "[..., O]"},
    nmse=_REDUCTION,
)
def _quantized_linear(name: str, container: str) -> OpSpec:
    return OpSpec(
        name,
        inputs={"x": "[..., K]", "weight": f"hal.quant.{container} [O, K] (prepared by the bound impl)"},
        outputs={"y": "[..., O]"},
        nmse=_REDUCTION,
    )


LINEAR_INT4 = _quantized_linear("linear_int4", "Int4Weight")
LINEAR_INT8 = _quantized_linear("linear_int8", "Int8Weight")
LINEAR_TERNARY = _quantized_linear("linear_ternary", "TernaryWeight")
LOGITS = OpSpec(
    "logits",
    inputs={"x": "[..., E]", "weight": "[V, E]"},
    outputs={"y": "[..., V] float32"},
    # bf16 x bf16 and fp16 x fp16 products are exact in float32: only the summation order differs
    nmse={"float32": 1e-10, "bfloat16": 1e-10, "float16": 1e-10},
)
ATTENTION_PREFILL = OpSpec(
    "attention_prefill",
    inputs={"q": "[B, T, H, D]", "k": "[B, T, Hk, D]", "v": "[B, T, Hk, D]", "kv_start": "[B] int64 | None"},
    outputs={"o": "[B, T, H, D]"},
    attrs={"scale": "float"},
    nmse=_REDUCTION,
)
ATTENTION_DECODE = OpSpec(
    "attention_decode",
    inputs={
        "q": "[B, T, H, D]",
        "k_cache": "[B, C, Hk, D]",
        "v_cache": "[B, C, Hk, D]",
        "kv_lens": "[B] int64",
    },
    outputs={"o": "[B, T, H, D]"},
    attrs={"scale": "float"},
    nmse=_REDUCTION,
)
KV_WRITE = OpSpec(
    "kv_write",
    inputs={
        "k_cache": "[B, C, Hk, D]",
        "v_cache": "[B, C, Hk, D]",
        "k": "[B, T, Hk, D]",
        "v": "[B, T, Hk, D]",
        "slots": "[B, T] int64",
    },
    outputs={"k_cache": "[B, C, Hk, D]", "v_cache": "[B, C, Hk, D]"},
    inplace=True,
    nmse={"float32": 0.0, "bfloat16": 0.0, "float16": 0.0},
)
INFLLM_COMPRESS_KEYS = OpSpec(
    "infllm_compress_keys",
    inputs={"k_cache": "[B, C, Hk, D]", "kv_lens": "[B] int64"},
    outputs={"kernels": "[B, N, Hk, D]"},
    attrs={"size": "int", "stride": "int"},
    nmse=_ELEMENTWISE,
)
INFLLM_APPEND_KERNEL = OpSpec(
    "infllm_append_kernel",
    inputs={"kernels": "[B, N, Hk, D]", "k_cache": "[B, C, Hk, D]", "kv_lens": "[B] int64"},
    outputs={"kernels": "[B, N, Hk, D]"},
    attrs={"size": "int", "stride": "int"},
    inplace=True,
    nmse=_ELEMENTWISE,
)
INFLLM_SELECT_BLOCKS = OpSpec(
    "infllm_select_blocks",
    inputs={"q": "[B, T, H, D]", "kernels": "[B, N1, Hk, D]", "coarse": "[B, N2, Hk, D]", "kv_lens": "[B] int64"},
    outputs={"blocks": "[B, Hk, T, K] int64"},
    attrs={"geometry": "hal.sparse.InfLLMGeometry", "scale": "float"},
    # integer output: the fraction of differing block ids. Scores are float32 sums from the same
    # inputs in every implementation, so only an exact tie could reorder them.
    nmse={"float32": 0.0, "bfloat16": 0.0, "float16": 0.0},
)
BLOCK_SPARSE_ATTENTION = OpSpec(
    "block_sparse_attention",
    inputs={
        "q": "[B, T, H, D]",
        "k_cache": "[B, C, Hk, D]",
        "v_cache": "[B, C, Hk, D]",
        "blocks": "[B, Hk, T, K] int64",
        "kv_lens": "[B] int64",
    },
    outputs={"o": "[B, T, H, D]"},
    attrs={"block_size": "int", "scale": "float"},
    nmse=_REDUCTION,
)
LIGHTNING_ATTENTION = OpSpec(
    "lightning_attention",
    inputs={"q": "[B, T, H, D]", "k": "[B, T, H, D]", "v": "[B, T, H, D]", "slopes": "[H] float32",
            "state": "[B, H, D, D] float32"},
    outputs={"o": "[B, T, H, D]", "new_state": "[B, H, D, D] float32"},
    attrs={"scale": "float"},
    # o: decayed sums of D-long dot products, rounded once to the model dtype, like attention.
    nmse=_REDUCTION,
    # new_state is float32 by contract and built from the already-rounded k and v: only the float32
    # summation order may differ (measured <= 6e-13 on the grid, cpu). A state rounded to bf16 (NMSE
    # ~5e-6 per rounding) would pass the bf16 bound of o unseen, and its error would compound over
    # the ~1/(1 - lambda) tokens the slowest heads remember (256 in SALA).
    output_nmse={"new_state": {"float32": 1e-10, "bfloat16": 1e-10, "float16": 1e-10}},
)
SAMPLE = OpSpec(
    "sample",
    inputs={"logits": "[B, V] float32"},
    outputs={"ids": "[B] int64"},
    attrs={"temperature": "float", "top_k": "int", "top_p": "float", "generator": "torch.Generator | None"},
    dtypes=("float32",),
    nmse={"float32": 0.0},
)

CATALOGUE: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        EMBEDDING,
        RMS_NORM,
        ADD_RMS_NORM,
        ROTARY,
        SWIGLU,
        SIGMOID_GATE,
        LINEAR,
        LINEAR_INT4,
        LINEAR_INT8,
        LINEAR_TERNARY,
        LOGITS,
        ATTENTION_PREFILL,
        ATTENTION_DECODE,
        KV_WRITE,
        INFLLM_COMPRESS_KEYS,
        INFLLM_APPEND_KERNEL,
        INFLLM_SELECT_BLOCKS,
        BLOCK_SPARSE_ATTENTION,
        LIGHTNING_ATTENTION,
        SAMPLE,
    )
}


def get_spec(name: str) -> OpSpec:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; the catalogue has: {', '.join(sorted(CATALOGUE))}") from None


# Whole model. A path that changes how the weights are held or multiplied (quantized kernels, a
# packed table, another device, the compiled decode layers) is judged on the logits against the
# float32 reference of the same weights, relative to the CPU's dense path in the same dtype: its
# rounding may be of the same size as dense's once more (a packed kernel rounds each group's scale
# and zero as dense rounds the weight), so its NMSE may be up to twice dense's. The floor keeps the
# bound meaningful where dense's NMSE is ~0 (float32: reordered sums only).
MODEL_NMSE_FACTOR = 2.0
MODEL_NMSE_FLOOR = {"float32": 1e-12, "bfloat16": 1e-7, "float16": 1e-7}


def model_nmse_bound(dtype: str, dense_nmse: float) -> float:
    """The largest logits NMSE (against the float32 reference on the same weights) a whole-model
    path in ``dtype`` may show, given the CPU dense path's NMSE in that dtype on the same inputs."""
    return MODEL_NMSE_FACTOR * dense_nmse + MODEL_NMSE_FLOOR[dtype]
