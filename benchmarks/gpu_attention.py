"""Kernel benchmarks of the CUDA backend, each side by side with what it replaces, in one run:

    python -m benchmarks.gpu_attention --device cuda --out attention.json
    TRITON_INTERPRET=1 python -m benchmarks.gpu_attention --dry-run --out dry.json   # CPU check

- ``copy``: device-to-device copy bandwidth (the HBM roofline of the decode benchmarks).
- ``attention_decode``: cuda.triton flash-decoding vs cuda.torch (SDPA over the longest row) at
  the 0.5B and 8B geometries; KV bytes read per second against the copy bandwidth.
- ``infllm``: InfLLM-v2 (semantic-kernel compression + stage-1 selection + block-sparse
  attention, 8B geometry, one layer, batch 1) vs dense SDPA flash attention at 32K / 64K / 128K
  keys, decode (one query) and prefill (every query of the prompt, causal).
- ``lightning``: cuda.triton lightning_attention prefill vs fla's ``chunk_simple_gla`` (when fla
  is installed; its output is also compared with ours).

``--dry-run`` runs every benchmark on tiny shapes on the CPU (Triton under the interpreter): a
check that this script works, its times mean nothing. Every record carries ``dry_run``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from hal.sparse import InfLLMGeometry

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GEOMETRY_0_5B = {"H": 16, "Hk": 2, "D": 64}
GEOMETRY_8B = {"H": 32, "Hk": 2, "D": 128}


def timer(device: str) -> Callable[[Callable[[], Any], int], float]:
    """``measure(fn, repeats)`` -> median seconds of one call (after one warm-up call)."""

    def measure(fn: Callable[[], Any], repeats: int) -> float:
        fn()
        times = []
        for _ in range(max(1, repeats)):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                began = time.perf_counter()
                fn()
                times.append(time.perf_counter() - began)
        return sorted(times)[len(times) // 2]

    return measure


def copy_bandwidth(device: str, measure, megabytes: int) -> dict[str, float]:
    """Bytes read + written per second by a device-to-device copy of ``megabytes``."""
    src = torch.empty(megabytes << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src), 10)
    return {"bytes": 2 * src.numel(), "seconds": seconds, "gb_per_s": 2 * src.numel() / seconds / 1e9}


def _cache(batch: int, capacity: int, kv_heads: int, dim: int, dtype, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, capacity, kv_heads, dim)
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype),
            torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype))


def bench_decode(device: str, dtype, measure, lengths: list[int], batches: list[int], repeats: int) -> list[dict]:
    from backends.cpu.ops import attention_decode_cpu
    from backends.cuda.decode_attention import attention_decode_triton

    rows = []
    for name, geo in (("0.5b", GEOMETRY_0_5B), ("8b", GEOMETRY_8B)):
        for batch in batches:
            for length in lengths:
                capacity = -(-(length + 1) // 128) * 128
                k, v = _cache(batch, capacity, geo["Hk"], geo["D"], dtype, device)
                q = torch.randn(batch, 1, geo["H"], geo["D"], device=device).to(dtype)
                lens = torch.full((batch,), length, dtype=torch.int64, device=device)
                scale = geo["D"] ** -0.5
                ours = measure(lambda: attention_decode_triton(q, k, v, lens, scale), repeats)
                torch_s = measure(lambda: attention_decode_cpu(q, k, v, lens, scale), repeats)
                kv_bytes = 2 * batch * length * geo["Hk"] * geo["D"] * k.element_size()
                rows.append({"geometry": name, "batch": batch, "kv_len": length, "triton_s": ours,
                             "torch_sdpa_s": torch_s, "speedup_vs_torch": torch_s / ours,
                             "kv_gb_per_s": kv_bytes / ours / 1e9})
    return rows


def _infllm_inputs(length: int, new: int, geo: dict[str, int], g: InfLLMGeometry, dtype, device):
    from backends.cpu.infllm import infllm_compress_keys_cpu

    capacity = -(-(length + 1) // 128) * 128
    k, v = _cache(1, capacity, geo["Hk"], geo["D"], dtype, device)
    q = torch.randn(1, new, geo["H"], geo["D"], device=device).to(dtype)
    lens = torch.tensor([length], device=device)
    kernels = infllm_compress_keys_cpu(k, lens, g.kernel_size, g.kernel_stride)
    coarse = infllm_compress_keys_cpu(k, lens, g.coarse_size, g.coarse_stride)
    return q, k, v, lens, kernels, coarse


def _dense_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """SDPA on `[B, H, T, D]` (k/v already expanded to H heads), flash backend on cuda."""
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def bench_infllm(device: str, dtype, measure, lengths: list[int], g: InfLLMGeometry, repeats: int,
                 prefill: bool) -> list[dict]:
    from backends.cpu.infllm import infllm_compress_keys_cpu
    from backends.cuda.infllm import block_sparse_attention_triton, infllm_select_blocks_triton

    geo = GEOMETRY_8B
    scale = geo["D"] ** -0.5
    targets = {32768: 2.0, 65536: 3.5, 131072: 6.0}
    rows = []
    for length in lengths:
        new = length if prefill else 1
        q, k, v, lens, kernels, coarse = _infllm_inputs(length, new, geo, g, dtype, device)

        def sparse():
            if prefill:  # the prompt's kernels are part of its cost; a decode step appends one (negligible)
                infllm_compress_keys_cpu(k, lens, g.kernel_size, g.kernel_stride)
                infllm_compress_keys_cpu(k, lens, g.coarse_size, g.coarse_stride)
            blocks = infllm_select_blocks_triton(q, kernels, coarse, lens, g, scale)
            return block_sparse_attention_triton(q, k, v, blocks, lens, g.block_size, scale)

        group = geo["H"] // geo["Hk"]
        qh = q.transpose(1, 2)
        kh = k[:, :length].transpose(1, 2).repeat_interleave(group, dim=1)
        vh = v[:, :length].transpose(1, 2).repeat_interleave(group, dim=1)
        ours = measure(sparse, repeats)
        dense = measure(lambda: _dense_flash(qh, kh, vh, prefill, scale), repeats)
        del kh, vh
        select = measure(lambda: infllm_select_blocks_triton(q, kernels, coarse, lens, g, scale), repeats)
        rows.append({"phase": "prefill" if prefill else "decode", "keys": length, "infllm_s": ours,
                     "select_s": select, "dense_sdpa_flash_s": dense, "speedup": dense / ours,
                     "target": targets.get(length)})
        del q, k, v, kernels, coarse
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_lightning(device: str, dtype, measure, lengths: list[int], heads: int, dim: int, repeats: int) -> dict:
    from backends.cuda.lightning import lightning_attention_triton
    from validation.opcheck import nmse, sala_slopes

    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as exc:  # noqa: BLE001 - fla is optional; record why it is absent
        chunk_simple_gla, fla_missing = None, f"fla not importable: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    else:
        fla_missing = None
    rows = []
    for length in lengths:
        g = torch.Generator(device=device).manual_seed(1)
        q, k, v = (torch.randn(1, length, heads, dim, generator=g, device=device).to(dtype) for _ in range(3))
        slopes = sala_slopes(heads).to(device)
        state = torch.zeros(1, heads, dim, dim, device=device)
        scale = dim ** -0.5
        ours = measure(lambda: lightning_attention_triton(q, k, v, slopes, state, scale), repeats)
        row: dict[str, Any] = {"T": length, "H": heads, "D": dim, "triton_s": ours}
        if chunk_simple_gla is not None:
            def fla():
                return chunk_simple_gla(q, k, v, g_gamma=-slopes, scale=scale, initial_state=state,
                                        output_final_state=True)

            row["fla_chunk_simple_gla_s"] = measure(fla, repeats)
            row["speedup_vs_fla"] = row["fla_chunk_simple_gla_s"] / ours
            o_fla, s_fla = fla()
            o_ours, s_ours = lightning_attention_triton(q, k, v, slopes, state, scale)
            row["nmse_o_vs_fla"] = nmse(o_ours.float(), o_fla.float())
            row["nmse_state_vs_fla"] = nmse(s_ours, s_fla.float())
        rows.append(row)
    return {"rows": rows, "fla": fla_missing or "installed"}


def run(dry_run: bool, device: str, dtype_name: str) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    measure = timer(device)
    out: dict[str, Any] = {"device": device, "dtype": dtype_name, "dry_run": dry_run, "torch": torch.__version__}
    if device == "cuda":
        out["card"] = torch.cuda.get_device_name(0)
    import triton

    out["triton"] = triton.__version__
    if dry_run:
        small = InfLLMGeometry(kernel_size=8, kernel_stride=4, coarse_size=32, coarse_stride=16, block_size=16,
                               init_blocks=1, local_blocks=2, budget=6)
        out["copy"] = copy_bandwidth(device, measure, 8)
        out["attention_decode"] = bench_decode(device, dtype, measure, [100], [1], 1)
        out["infllm_decode"] = bench_infllm(device, dtype, measure, [200], small, 1, prefill=False)
        out["infllm_prefill"] = bench_infllm(device, dtype, measure, [40], small, 1, prefill=True)
        out["lightning"] = bench_lightning(device, dtype, measure, [70], 2, 64, 1)
        return out
    out["copy"] = copy_bandwidth(device, measure, 1024)
    out["attention_decode"] = bench_decode(device, dtype, measure, [4096, 32768], [1, 8], 20)
    real = InfLLMGeometry()
    out["infllm_decode"] = bench_infllm(device, dtype, measure, [32768, 65536, 131072], real, 20, prefill=False)
    out["infllm_prefill"] = bench_infllm(device, dtype, measure, [32768, 65536, 131072], real, 3, prefill=True)
    out["lightning"] = bench_lightning(device, dtype, measure, [4096, 16384], 32, 128, 5)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    device, dtype = args.device, args.dtype
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("error: --dry-run needs TRITON_INTERPRET=1 in the environment (set before triton loads)",
                  file=sys.stderr)
            return 2
        device, dtype = "cpu", "float16" if dtype == "bfloat16" else dtype  # bf16 is garbage under the interpreter
    elif device == "cuda" and not torch.cuda.is_available():
        print("error: device 'cuda' is not available: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    result = run(args.dry_run, device, dtype)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
    tmp.replace(args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
