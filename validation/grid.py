"""Which cases to run: the conformance grid (edges included) and the shapes a model used.

The grid covers seq 1, lengths that are no multiple of a block size (63, 65), GQA ratios
1/2/8/16, head_dim 64/128, odd sizes (E=60), lightning_attention over several 64-token chunks
from zero and non-zero states, and every dtype the op's contract allows.
"""
from __future__ import annotations

from typing import Iterable

from hal.ops import CATALOGUE, get_spec
from model.cache import KV_BLOCK
from hal.sparse import InfLLMGeometry
from validation.opcheck import Case, case, geometry_dims

SMALL_GEOMETRY = InfLLMGeometry(kernel_size=8, kernel_stride=4, coarse_size=32, coarse_stride=16, block_size=16,
                               init_blocks=1, local_blocks=2, budget=6)
"""InfLLM-v2 grid cases: MiniCPM4's ratios scaled down (8/4 and 32/16 kernels, 16-token blocks)
so selection is non-trivial at a few hundred keys."""

GQA = ((4, 4), (4, 2), (16, 2), (16, 1))  # (H, Hk): ratios 1, 2, 8, 16


def capacity(longest: int) -> int:
    """A cache capacity C for rows of up to ``longest`` tokens: the next multiple of 128 above it
    (so every case has unused positions, which hold garbage)."""
    return (longest // KV_BLOCK + 1) * KV_BLOCK


QUANTIZED_GRID = {
    # (T, K, O, group size, source): decode and prefill rows, one group per row, GGUF's 32
    "linear_int4": ((1, 128, 256, 32, "q4_0"), (63, 64, 48, 64, "gptq"), (5, 512, 1024, 128, "q4_1")),
    "linear_int8": ((1, 128, 256, 128, "rtn"), (63, 64, 48, 32, "q8_0"), (5, 512, 1024, 32, "q8_0")),
    "linear_ternary": ((1, 128, 256, 128, "bitcpm4"), (63, 64, 48, 32, "rtn"), (5, 512, 1024, 64, "rtn")),
}
"""Quantized linear cases; the flag names the container's source format (``hal/quant.py``)."""


def _grid_dims(op: str) -> list[tuple[dict[str, int], tuple[str, ...]]]:
    if op == "embedding":
        return [({"B": 1, "T": 1, "V": 1000, "E": 64}, ()), ({"B": 2, "T": 63, "V": 1000, "E": 60}, ())]
    if op in ("rms_norm", "add_rms_norm"):
        return [({"B": 1, "T": t, "E": e}, ()) for t, e in ((1, 64), (63, 60), (7, 1024))]
    if op == "rotary":
        return [({"B": b, "T": t, "H": h, "Hk": hk, "D": d, "P": p}, ())
                for b, t, (h, hk), d, p in ((1, 1, GQA[0], 64, 100), (2, 63, GQA[2], 128, 0),
                                            (1, 5, GQA[3], 64, 4000))]
    if op == "swiglu":
        return [({"B": 1, "T": t, "F": f}, ()) for t, f in ((1, 256), (63, 60))]
    if op == "sigmoid_gate":
        return [({"B": 1, "T": t, "E": e}, ()) for t, e in ((1, 256), (63, 60))]
    if op == "linear":
        sizes = ((1, 128, 256), (63, 60, 44), (5, 512, 1024))
        return [({"B": 1, "T": t, "K": k, "O": o}, ()) for t, k, o in sizes]
    if op == "logits":
        # tiny / wide: the dynamic ranges a float16 copy of a bfloat16 lm_head must scale for / refuse;
        # T=33: past cpu.fbgemm's FBGEMM_MAX_ROWS (its chunked path)
        return [({"B": 1, "T": t, "E": e, "V": v}, flags)
                for t, e, v, flags in ((1, 64, 3000, ()), (7, 60, 1000, ()), (33, 60, 1000, ()),
                                       (1, 64, 3000, ("tiny",)), (5, 60, 1000, ("wide",)))]
    if op in QUANTIZED_GRID:
        return [({"B": 1, "T": t, "K": k, "O": o, "G": gs}, (source,)) for t, k, o, gs, source in QUANTIZED_GRID[op]]
    if op == "attention_prefill":
        cases = [({"B": 1, "T": t, "H": h, "Hk": hk, "D": d}, ())
                 for t, (h, hk), d in ((1, GQA[0], 64), (63, GQA[1], 64), (17, GQA[2], 128),
                                       (65, GQA[3], 64))]
        cases.append(({"B": 2, "T": 13, "H": 4, "Hk": 2, "D": 64}, ("padded",)))
        return cases
    if op == "attention_decode":
        cases = [({"B": 1, "T": t, "S": s, "C": capacity(s), "H": h, "Hk": hk, "D": d}, ())
                 for t, s, (h, hk), d in ((1, 1, GQA[0], 64), (1, 65, GQA[1], 128), (1, 63, GQA[2], 64),
                                          (3, 40, GQA[3], 128))]
        cases.append(({"B": 2, "T": 1, "S": 20, "C": 128, "H": 4, "Hk": 2, "D": 64}, ("ragged",)))
        cases.append(({"B": 3, "T": 4, "S": 130, "C": 256, "H": 4, "Hk": 2, "D": 64}, ("ragged",)))
        return cases
    if op == "kv_write":
        return [({"B": 1, "T": 1, "C": 128, "Hk": 2, "D": 64}, ()),
                ({"B": 2, "T": 7, "C": 128, "Hk": 2, "D": 64}, ()),
                ({"B": 3, "T": 1, "C": 256, "Hk": 2, "D": 128}, ("ragged",)),
                ({"B": 2, "T": 13, "C": 128, "Hk": 1, "D": 64}, ("padded",)),
                ({"B": 2, "T": 5, "C": 128, "Hk": 4, "D": 64}, ("ragged",))]
    if op == "infllm_compress_keys":
        return [({"B": 1, "S": 100, "C": capacity(100), "Hk": 2, "D": 64, "W": 32, "R": 16}, ()),
                ({"B": 3, "S": 300, "C": capacity(300), "Hk": 2, "D": 128, "W": 128, "R": 64}, ("ragged",)),
                ({"B": 2, "S": 20, "C": 128, "Hk": 1, "D": 64, "W": 32, "R": 16}, ("ragged",))]
    if op == "infllm_append_kernel":
        # rows of 96/64/32 keys each complete a 32/16 kernel; 100/67 complete none; 20 < size
        return [({"B": 3, "S": 96, "C": capacity(96), "Hk": 2, "D": 64, "W": 32, "R": 16}, ("ragged",)),
                ({"B": 2, "S": 100, "C": capacity(100), "Hk": 2, "D": 128, "W": 32, "R": 16}, ("ragged",)),
                ({"B": 2, "S": 256, "C": capacity(256), "Hk": 1, "D": 64, "W": 128, "R": 64}, ("ragged",)),
                ({"B": 1, "S": 20, "C": 128, "Hk": 2, "D": 64, "W": 32, "R": 16}, ())]
    if op in ("infllm_select_blocks", "block_sparse_attention"):
        small, real = geometry_dims(SMALL_GEOMETRY), geometry_dims(InfLLMGeometry())  # real: MiniCPM4-8B's
        return [({"B": 1, "T": 1, "S": 300, "C": capacity(300), "H": 4, "Hk": 2, "D": 64, **small}, ()),
                ({"B": 2, "T": 3, "S": 200, "C": capacity(200), "H": 16, "Hk": 1, "D": 64, **small}, ("ragged",)),
                ({"B": 1, "T": 100, "S": 100, "C": capacity(100), "H": 4, "Hk": 2, "D": 128, **small}, ()),
                ({"B": 1, "T": 1, "S": 7000, "C": capacity(7000), "H": 32, "Hk": 2, "D": 64, **real}, ()),
                # budget x block (6144) >= capacity: block_sparse_attention's masked path
                ({"B": 2, "T": 2, "S": 1000, "C": capacity(1000), "H": 4, "Hk": 2, "D": 64, **real}, ("ragged",))]
    if op == "lightning_attention":
        # T=1 decode steps, T=63/65 around one 64-token chunk, T=130 over three chunks (last partial)
        return [({"B": 1, "T": 1, "H": 4, "D": 64}, ("state",)),
                ({"B": 2, "T": 1, "H": 4, "D": 128}, ("state",)),
                ({"B": 2, "T": 63, "H": 4, "D": 64}, ()),
                ({"B": 1, "T": 65, "H": 4, "D": 128}, ("state",)),
                ({"B": 2, "T": 130, "H": 4, "D": 64}, ("state",)),
                ({"B": 1, "T": 130, "H": 4, "D": 128}, ())]
    if op == "sample":
        return [({"B": 3, "V": 1000}, ()), ({"B": 2, "V": 1000}, ("ties",))]
    raise KeyError(f"no conformance grid for op {op!r}")


def grid(op: str, dtypes: Iterable[str] | None = None) -> list[Case]:
    """The conformance cases of one op, for each dtype of its contract (or of ``dtypes``)."""
    allowed = get_spec(op).dtypes
    chosen = [d for d in (dtypes or allowed) if d in allowed]
    return [Case(op, dtype, tuple(dims.items()), flags) for dtype in chosen for dims, flags in _grid_dims(op)]


def full_grid(dtypes: Iterable[str] | None = None) -> list[Case]:
    return [c for op in CATALOGUE for c in grid(op, dtypes)]


MAX_LINEAR_ELEMENTS = 1 << 24  # cap the lm_head weight a model-shape case allocates


def model_cases(shapes: dict[str, int], dtype: str, lengths: Iterable[int], decode_len: int,
                sparse: InfLLMGeometry | None = None, lightning_heads: int = 0) -> list[Case]:
    """Cases on the shapes a model used: ``shapes`` from ``MiniCPMConfig.shapes()``, prompt
    ``lengths`` (T of each prefill), ``decode_len`` (S, the cached length, of a one-token
    decode step; its cache capacity C is the next multiple of 128 above it). ``sparse``: the
    model's InfLLM-v2 geometry (its ops are checked on a decode step at ``decode_len``).
    ``lightning_heads``: MiniCPM-SALA's lightning layers (their attention and output gate)."""
    e, f, v, h, hk, d = (shapes[k] for k in ("E", "F", "V", "H", "Hk", "D"))
    ts = sorted(set(lengths))
    dt = dtype if dtype in get_spec("rms_norm").dtypes else "float32"
    out: list[Case] = []
    for t in ts:
        out.append(case("embedding", dt, V=v, E=e, B=1, T=t))
        out.append(case("rms_norm", dt, B=1, T=t, E=e))
        out.append(case("add_rms_norm", dt, B=1, T=t, E=e))
        out.append(case("rotary", dt, B=1, T=t, H=h, Hk=hk, D=d, P=0))
        out.append(case("swiglu", dt, B=1, T=t, F=f))
        for k_in, o_out in ((e, (h + 2 * hk) * d), (h * d, e), (e, 2 * f), (f, e)):  # fused qkv, gate_up
            out.append(case("linear", dt, B=1, T=t, K=k_in, O=o_out))
        out.append(case("logits", dt, B=1, T=t, E=e, V=min(v, max(1, MAX_LINEAR_ELEMENTS // e))))
        out.append(case("attention_prefill", dt, B=1, T=t, H=h, Hk=hk, D=d))
        out.append(case("kv_write", dt, B=1, T=t, C=capacity(t), Hk=hk, D=d))
        if lightning_heads:
            out.append(case("lightning_attention", dt, B=1, T=t, H=lightning_heads, D=d))
            out.append(case("sigmoid_gate", dt, B=1, T=t, E=lightning_heads * d))
    if lightning_heads:
        out.append(case("lightning_attention", dt, ("state",), B=1, T=1, H=lightning_heads, D=d))
    s = max(1, decode_len)
    out.append(case("kv_write", dt, B=1, T=1, C=capacity(s), Hk=hk, D=d))
    out.append(case("attention_decode", dt, B=1, T=1, S=s, C=capacity(s), H=h, Hk=hk, D=d))
    if sparse is not None:
        for size, stride in ((sparse.kernel_size, sparse.kernel_stride), (sparse.coarse_size, sparse.coarse_stride)):
            out.append(case("infllm_compress_keys", dt, B=1, S=s, C=capacity(s), Hk=hk, D=d, W=size, R=stride))
            out.append(case("infllm_append_kernel", dt, B=1, S=s, C=capacity(s), Hk=hk, D=d, W=size, R=stride))
        for op in ("infllm_select_blocks", "block_sparse_attention"):
            out.append(case(op, dt, B=1, T=1, S=s, C=capacity(s), H=h, Hk=hk, D=d, **geometry_dims(sparse)))
    out.append(case("sample", "float32", B=1, V=v))
    seen: set[str] = set()
    return [c for c in out if not (c.label in seen or seen.add(c.label))]
