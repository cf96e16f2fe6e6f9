"""bind() on cuda picks the Triton kernels (and says why when it does not); they are capturable:
on a GPU a CUDA graph captured once replays correctly for new lengths, on CPU the launchers are
shown to read no tensor value on the host."""
from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE, ON_GPU

from backends.cpu.reference.attention import attention_decode_ref
from backends.cuda import TRITON_KERNELS, supports
from backends.cuda.decode_attention import attention_decode_triton
from hal.registry import bind
from model.decode_graph import GRAPH_OPS
from validation.grid import SMALL_GEOMETRY
from validation.opcheck import case, check, geometry_dims

SMALL = geometry_dims(SMALL_GEOMETRY)

MINICPM4_8B = {"E": 4096, "F": 16384, "V": 73448, "H": 32, "Hk": 2, "D": 128}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_binds_the_triton_kernels(dtype):
    ops = bind("cuda", dtype, MINICPM4_8B)
    for op in TRITON_KERNELS:
        assert ops.record[op].impl == "cuda.triton", ops.record[op].describe()
    assert ops.record["attention_prefill"].impl == "cuda.torch"  # SDPA flash unless ours measures faster
    assert ops.attention_decode.__module__ == "backends.cuda.decode_attention"


def test_decode_graphs_bind_them_too():
    ops = bind("cuda", torch.bfloat16, MINICPM4_8B, capture=GRAPH_OPS)
    assert {ops.record[op].impl for op in TRITON_KERNELS} == {"cuda.triton"}


def test_unsupported_head_dim_falls_to_torch_with_the_reason():
    ops = bind("cuda", torch.bfloat16, {**MINICPM4_8B, "D": 96})
    binding = ops.record["attention_decode"]
    assert binding.impl == "cuda.torch"
    assert ("cuda.triton", "cuda.attention_decode: head_dim must be in (32, 64, 128), got 96") in binding.passed_over


def test_without_triton_the_reason_says_so(monkeypatch):
    monkeypatch.setattr(supports, "triton_available", lambda: False)
    ops = bind("cuda", torch.bfloat16, MINICPM4_8B)
    binding = ops.record["lightning_attention"]
    assert binding.impl == "cuda.torch"
    assert binding.passed_over[0][1].startswith("cuda.lightning_attention: triton must be installed")


def _decode_inputs(lengths: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lengths), 1, 8, 64, generator=g)
    k = torch.randn(len(lengths), 384, 2, 64, generator=g)
    v = torch.randn(len(lengths), 384, 2, 64, generator=g)
    return q, k, v, torch.tensor(lengths)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU; the CPU check is the no-host-read test below")
def test_decode_attention_replays_from_a_cuda_graph_with_new_lengths():
    q, k, v, lens = (x.cuda() for x in _decode_inputs([300, 17], 0))
    attention_decode_triton(q, k, v, lens, 0.125)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_decode_triton(q, k, v, lens, 0.125)
    for lengths, seed in (([5, 380], 1), ([384, 1], 2)):
        new = _decode_inputs(lengths, seed)
        for buffer, value in zip((q, k, v, lens), new):
            buffer.copy_(value)
        graph.replay()
        ref = attention_decode_ref(*new, 0.125)
        assert torch.allclose(out.cpu(), ref, atol=1e-4, rtol=1e-4)


NO_HOST_READ = [
    case("attention_decode", "float32", ("ragged",), B=2, T=1, S=300, C=384, H=8, Hk=2, D=64),
    case("infllm_select_blocks", "float32", ("ragged",), B=2, T=2, S=200, C=256, H=4, Hk=2, D=64, **SMALL),
    case("block_sparse_attention", "float32", ("ragged",), B=2, T=2, S=200, C=256, H=4, Hk=2, D=64, **SMALL),
    case("lightning_attention", "float32", ("state",), B=2, T=20, H=2, D=64),
]


@pytest.mark.parametrize("c", NO_HOST_READ, ids=lambda c: c.op)
def test_kernels_read_no_tensor_value_on_the_host(c, monkeypatch):
    """What a CUDA graph needs (the GPU test above replays one): grids, split counts and scratch
    sizes come from shapes. With every host read of a tensor value made to raise, each launcher
    still runs and matches the reference (the interpreter itself reads memory through numpy,
    not through these)."""
    fn = bind("cuda", torch.float32, MINICPM4_8B).record[c.op]
    assert fn.impl == "cuda.triton"
    kernel = registry_fn(c.op)

    def refuse(*_args, **_kwargs):
        raise AssertionError("host read of a tensor value")

    def guarded(**kwargs):
        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__"):
                patch.setattr(torch.Tensor, name, refuse)
            return kernel(**kwargs)

    result = check(c, guarded, "cuda.triton (no host reads)", DEVICE)
    assert result.status == "ok", result.line() + f" {result.reason}"


def registry_fn(op: str):
    from hal.registry import implementations

    return next(i for i in implementations(op, "cuda") if i.name == "triton").load()
