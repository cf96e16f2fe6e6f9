"""Compile every Triton kernel of this backend for a GPU architecture, without a GPU:

    python -m backends.cuda.compile_check                 # sm_90 (H100 / H200) and sm_80 (A100)
    python -m backends.cuda.compile_check --arch 90

The interpreter (``TRITON_INTERPRET=1``, what CI runs the kernels with) checks their arithmetic
but not that they compile: layouts, ``tl.dot`` shapes and dtypes, bfloat16 (which the interpreter
cannot run on CPU tensors), register and shared-memory budgets. This lowers each kernel variant
the model uses to a cubin with the ptxas bundled in the triton wheel, and prints its shared
memory, registers and spills. Must run without ``TRITON_INTERPRET`` (it is refused: exit 2).
Exit 0 when every variant compiles, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

INT_ARGS = "i32"


def _signature(fn, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict[str, Any]):
    """Triton's (signature, constexprs) for ``fn``: pointers by name, the other non-constexpr
    arguments int32 unless listed in ``floats``."""
    sig, consts = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            consts[(index,)] = constexprs[name]
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in floats else INT_ARGS
    return sig, consts


def variants(dtype: str = "bf16", quick: bool = False) -> list[tuple[str, Any, dict[str, str], tuple[str, ...],
                                                                   dict[str, Any]]]:
    """(label, kernel, pointer types, float args, constexprs) of every variant the model launches;
    ``quick``: one variant per kernel (head_dim 128, split decode, 64-wide lightning tiles)."""
    from backends.cuda import decode_attention as da
    from backends.cuda import infllm, lightning

    act = f"*{dtype}"
    f32, i32 = "*fp32", "*i32"
    ieee = dtype == "fp32"
    out: list = []
    for dim in (128,) if quick else (64, 128):
        for direct in (False,) if quick else (True, False):
            out.append((f"decode_split D{dim} direct={direct}", da._decode_split_kernel,
                        {"q_ptr": act, "k_ptr": act, "v_ptr": act, "lens_ptr": i32, "o_part_ptr": f32,
                         "lse_part_ptr": f32, "o_ptr": act}, ("scale",),
                        {"BLOCK_M": 16, "BLOCK_N": da.BLOCK_N, "HEAD_DIM": dim, "IEEE": ieee, "DIRECT": direct}))
        out.append((f"combine D{dim}", da._combine_kernel, {"o_part_ptr": f32, "lse_part_ptr": f32, "o_ptr": act}, (),
                    {"BLOCK_R": 16, "HEAD_DIM": dim}))
        out.append((f"infllm stage-1 scores D{dim} G16", infllm._kernel_scores_kernel,
                    {"q_ptr": act, "fine_ptr": act, "coarse_ptr": act, "lens_ptr": i32, "s_ptr": f32}, ("scale",),
                    {"KS": 32, "KR": 16, "CS": 128, "CR": 64, "BT": 2, "GP": 16, "BLOCK_N": infllm.KERNEL_TILE,
                     "HEAD_DIM": dim, "IEEE": ieee}))
        out.append((f"block_sparse D{dim} G16", infllm._block_sparse_kernel,
                    {"q_ptr": act, "k_ptr": act, "v_ptr": act, "blocks_ptr": i32, "lens_ptr": i32, "o_part_ptr": f32,
                     "lse_part_ptr": f32, "o_ptr": act}, ("scale",),
                    {"BLOCK_M": 16, "BLOCK_SIZE": 64, "HEAD_DIM": dim, "IEEE": ieee, "DIRECT": False}))
        for bv in (64,) if quick else (32, 64):
            out.append((f"lightning D{dim} BV{bv}", lightning._lightning_kernel,
                        {"q_ptr": act, "k_ptr": act, "v_ptr": act, "slopes_ptr": f32, "state_ptr": f32, "o_ptr": act,
                         "new_state_ptr": f32}, ("scale",),
                        {"BT": 64, "HEAD_DIM": dim, "BV": bv}))
    return out + quant_variants(dtype, quick)


def quant_variants(dtype: str = "bf16", quick: bool = False) -> list:
    """The quantized linears' variants (``quant_linear.py``): GEMV and GEMM for int4 (GPTQ zeros and
    Q4_1 mins, float16 scales), int8 and ternary (float32 scales); ``quick``: the int4 pair only."""
    from backends.cuda import quant_linear as ql

    act, f32 = f"*{dtype}", "*fp32"
    formats = [("int4 zeros+mins fp16-scales", 4, "*u8", "*fp16", True, True)]
    if not quick:
        formats += [("int8 fp32-scales", 8, "*i8", f32, False, False), ("ternary fp32-scales", 2, "*u8", f32, False, False)]
    out: list = []
    for label, bits, codes, scales, zeros, mins in formats:
        ptrs = {"x_ptr": act, "codes_ptr": codes, "scales_ptr": scales, "zeros_ptr": scales, "mins_ptr": scales,
                "out_ptr": act}
        flags = {"GROUP": 128, "BITS": bits, "HAS_ZEROS": zeros, "HAS_MINS": mins}
        out.append((f"quant gemv {label}", ql._gemv_kernel, {**ptrs, "part_ptr": f32}, ("zero",),
                    {"BLOCK_N": 64, "BLOCK_K": 128, "DIRECT": False, **flags}))
        out.append((f"quant gemm {label}", ql._gemm_kernel, ptrs, ("zero",),
                    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "IEEE": dtype == "fp32", **flags}))
    return out


def compile_all(arch: int, dtype: str, quick: bool = False, only: str = "") -> list[str]:
    """Compiles every variant for ``sm_<arch>``; returns the failures (one line each)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    failures = []
    for label, fn, pointers, floats, constexprs in variants(dtype, quick):
        if not label.startswith(only):
            continue
        sig, consts = _signature(fn, pointers, floats, constexprs)
        warps = 8 if label.startswith("lightning D128") else 4
        try:
            kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                                    options={"num_warps": warps})
        except Exception as exc:  # noqa: BLE001 - a kernel that does not compile is a result
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            failures.append(f"sm_{arch} {dtype} {label}: {type(exc).__name__}: {first}")
            print(f"sm_{arch} {dtype} {label}: FAILED {first}", flush=True)
            continue
        meta = kernel.metadata
        print(f"sm_{arch} {dtype} {label}: ok (shared {meta.shared} B, {kernel.n_regs} regs, "
              f"{kernel.n_spills} spills)" if hasattr(kernel, "n_regs") else
              f"sm_{arch} {dtype} {label}: ok (shared {meta.shared} B)", flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m backends.cuda.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", default=[], help="compute capability x10 (default: 90, 80)")
    p.add_argument("--dtype", action="append", default=[], choices=("bf16", "fp16", "fp32"),
                   help="activation dtype (default: bf16)")
    p.add_argument("--quick", action="store_true", help="one variant per kernel (head_dim 128)")
    p.add_argument("--only", default="", metavar="PREFIX", help="the variants whose label starts so (e.g. 'quant')")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: compile_check lowers real kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    failures = []
    for arch in args.arch or [90, 80]:
        for dtype in args.dtype or ["bf16"]:
            failures += compile_all(arch, dtype, args.quick, args.only)
    print(f"{'all variants compiled' if not failures else f'{len(failures)} failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
