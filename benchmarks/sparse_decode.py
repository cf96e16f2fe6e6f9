"""One InfLLM-v2 decode step of one attention layer against dense decode attention, on the CPU
torch implementations (MiniCPM4-8B shapes: 32 query heads, 2 KV heads, head_dim 128, bf16):

    python -m benchmarks.sparse_decode [--lengths 8192 32768] [--rounds 5]

The sparse step is what the model runs per layer and token past dense_len: append the kernels
the new key completes, select blocks, attend over the selected blocks (gathered). Rounds are
interleaved; medians are printed with their ratio (same run, same machine).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from backends.cpu import infllm
from backends.cpu.ops import attention_decode_cpu
from hal.sparse import InfLLMGeometry

HEADS, KV_HEADS, DIM = 32, 2, 128


def measure(length: int, rounds: int, device: str = "cpu") -> dict[str, float]:
    """Median milliseconds of a dense and a sparse decode step over ``length`` cached keys, on the
    portable torch implementations placed on ``device`` (cpu, cuda or npu; device-synchronised)."""
    from benchmarks.decode_graph import synchronizer
    from hal.probing import torch_device

    dev, sync = torch_device(device), synchronizer(device)
    g = InfLLMGeometry()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, HEADS, DIM, generator=gen).bfloat16().to(dev)
    k = torch.randn(1, length, KV_HEADS, DIM, generator=gen).bfloat16().to(dev)
    v = torch.randn(1, length, KV_HEADS, DIM, generator=gen).bfloat16().to(dev)
    lens, scale = torch.tensor([length], device=dev), DIM ** -0.5
    fine = infllm.infllm_compress_keys_cpu(k, lens, g.kernel_size, g.kernel_stride)
    coarse = infllm.infllm_compress_keys_cpu(k, lens, g.coarse_size, g.coarse_stride)

    def dense() -> None:
        attention_decode_cpu(q, k, v, lens, scale)

    def sparse() -> None:
        infllm.infllm_append_kernel_cpu(fine, k, lens, g.kernel_size, g.kernel_stride)
        infllm.infllm_append_kernel_cpu(coarse, k, lens, g.coarse_size, g.coarse_stride)
        blocks = infllm.infllm_select_blocks_cpu(q, fine, coarse, lens, g, scale)
        infllm.block_sparse_attention_cpu(q, k, v, blocks, lens, g.block_size, scale)

    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    dense(), sparse()  # warm-up
    for _ in range(rounds):
        for name, fn in (("dense", dense), ("sparse", sparse)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sparse_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one layer, one query, bf16, "
          f"H={HEADS} Hk={KV_HEADS} D={DIM}, budget 96 blocks of 64")
    print("| cached keys | dense ms | sparse ms | dense / sparse |")
    print("|---|---|---|---|")
    for length in args.lengths:
        r = measure(length, args.rounds)
        print(f"| {length} | {r['dense']:.1f} | {r['sparse']:.1f} | {r['dense'] / r['sparse']:.2f}x |")
    return 0


if __name__ == "__main__":
    from hal.cli import run_main

    sys.exit(run_main(main, None, "benchmarks.sparse_decode"))  # exit codes and signals: hal/cli.py
