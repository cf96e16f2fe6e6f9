"""One rank of the tensor-parallel tests (tests/test_tp.py starts WORLD_SIZE of these, with the
torchrun variables set): loads each checkpoint with ``hal.load_model(..., tp=WORLD_SIZE)``,
runs the fixed inputs of :func:`inputs` (uncached logits, cached prefill + decode logits, greedy
tokens) and rank 0 writes everything, with every rank's weight bytes, to OUT as safetensors.

    python tests/tp_worker.py OUT CHECKPOINT [CHECKPOINT ...]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

LONG = 90
"""Prompt length: past dense_len=64 of the sparse presets, so InfLLM-v2 selection runs."""


def inputs(vocab: int) -> dict[str, object]:
    """The fixed inputs of one checkpoint: ids `[2, LONG]`, two ragged prompts, decode steps."""
    ids = torch.tensor([[(37 * i + 11 * row) % (vocab - 10) + 3 for i in range(LONG)] for row in range(2)])
    return {"ids": ids, "prompts": [ids[0, :LONG].tolist(), ids[1, :LONG - 20].tolist()], "new_tokens": 6}


def run(model, vocab: int) -> dict[str, torch.Tensor]:
    """Uncached logits of ids, cached logits (prefill of LONG-4, then 4 decode steps), greedy tokens."""
    data = inputs(vocab)
    ids = data["ids"]
    out = {"logits": model.logits(ids)}
    cache = model.new_cache(2, LONG)
    steps = [model.forward(ids[:, :LONG - 4], cache=cache).logits[:, -1]]
    for t in range(LONG - 4, LONG):
        steps.append(model.forward(ids[:, t:t + 1], cache=cache).logits[:, -1])
    out["cached"] = torch.stack(steps, dim=1).float().cpu()
    tokens = model.generate(data["prompts"], data["new_tokens"], do_sample=False, eos_token_id=[])
    out["greedy"] = torch.tensor(tokens, dtype=torch.int64)
    return out


def main(argv: list[str]) -> int:
    import hal
    from hal.cli import run_main
    from model.safetensors_mmap import write_safetensors
    from model.tp import weight_bytes

    out_path, checkpoints = Path(argv[0]), [Path(p) for p in argv[1:]]
    tp = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)

    def body(_):
        results: dict[str, torch.Tensor] = {}
        for index, path in enumerate(checkpoints):
            model = hal.load_model(path, "cpu", "float32", tp=tp)
            for key, value in run(model, model.config.vocab_size).items():
                results[f"{index}.{key}"] = value.contiguous()
            mine = torch.tensor([weight_bytes(model)], dtype=torch.int64)
            results[f"{index}.rank_bytes"] = model.tp.group.all_gather(mine, dim=0)
            # sampling without a seed: every rank must draw the same tokens (rank 0's seed is shared)
            sampled = torch.tensor(model.generate([inputs(model.config.vocab_size)["prompts"][1]], 8, do_sample=True,
                                                  temperature=1.0, eos_token_id=[]), dtype=torch.int64)
            results[f"{index}.rank_sampled"] = model.tp.group.all_gather(sampled, dim=0)
        if model.tp.group.rank == 0:
            write_safetensors(out_path, results)
        return 0

    try:
        return run_main(body, None, "tp_worker")
    finally:
        from hal import distributed

        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
