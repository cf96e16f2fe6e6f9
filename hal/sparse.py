"""InfLLM-v2 block-selection geometry: the attribute of ``infllm_select_blocks`` and
``block_sparse_attention`` (``hal/ops.py`` has their semantics). Built from a checkpoint's
``sparse_config`` by ``model/config.py``; research/minicpm4_spec.md §4 has the algorithm.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InfLLMGeometry:
    """kernel_size / kernel_stride: the fine semantic kernels (mean-pooled key chunks; 32 / 16).
    coarse_size / coarse_stride: the coarse ones used only for the softmax normaliser (128 / 64).
    block_size: tokens per attention block (64). init_blocks: first blocks always attended (1).
    local_blocks: blocks before the query's own block always attended (window_size // block_size
    = 32). budget: blocks attended per query and KV head (v2: topk + local_blocks = 96)."""

    kernel_size: int = 32
    kernel_stride: int = 16
    coarse_size: int = 128
    coarse_stride: int = 64
    block_size: int = 64
    init_blocks: int = 1
    local_blocks: int = 32
    budget: int = 96

    def kernels(self, length: int, coarse: bool = False) -> int:
        """How many complete kernels ``length`` keys hold."""
        size, stride = (self.coarse_size, self.coarse_stride) if coarse else (self.kernel_size, self.kernel_stride)
        return max(0, (length - size) // stride + 1)

    def overlapping_kernels(self, block: int) -> range:
        """Fine kernels sharing a token with ``block`` (4b-1 .. 4b+3 for 32/16/64), from 0."""
        first = (block * self.block_size - self.kernel_size) // self.kernel_stride + 1
        last = -(-(block + 1) * self.block_size // self.kernel_stride) - 1
        return range(max(first, 0), last + 1)
