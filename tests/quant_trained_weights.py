"""Real quantized linears for the kernel tests: a few Q4_1 / Q8_0 tensors of the trained fixture
(SmolLM2-135M-Instruct Q4_1 GGUF) as ``hal.quant`` containers, read once per session with the
``gguf`` package and ``model.gguf_quant`` (the loader's own container code). Their scales and
mins are a trained model's, unlike the random containers of the conformance grid."""
from __future__ import annotations

import functools

import torch

from hal import quant

TENSORS = ("blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.3.ffn_gate.weight")
EMBEDDING_ROWS = 256  # a Q8_0 slice of token_embd (its only Q8_0 tensor)


@functools.lru_cache(maxsize=1)
def trained_containers(path: str) -> tuple[quant.QuantizedWeight, ...]:
    import gguf

    from model.gguf_quant import container

    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    out = []
    for name in TENSORS + ("token_embd.weight",):
        t = by_name[name]
        rows, k = int(t.shape[1]), int(t.shape[0])  # GGUF shapes are reversed
        blocks = t.data.reshape(rows, -1)
        if name == "token_embd.weight":
            rows, blocks = EMBEDDING_ROWS, blocks[:EMBEDDING_ROWS]
        out.append(container(path, name, t.tensor_type.name, blocks, (rows, k)))
    return tuple(out)


def activations(k: int, rows: int, seed: int = 0) -> torch.Tensor:
    """float32 `[rows, k]` of a hidden state's magnitude (an RMS-normed input times a norm weight)."""
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
