"""Token generation: greedy and sampling (temperature, top-k, top-p) with a KV cache, batch > 1
(left-padded), EOS stopping and a streaming callback."""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Sequence

import torch

from hal.errors import InputError, NonFiniteError

Streamer = Callable[[int, int], None]
PREFILL_CHUNK = 8192


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns input_ids `[B, T]` left-padded with pad_id and kv_start `[B]` (pad counts)."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    start = torch.zeros(len(prompts), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        start[row] = longest - len(prompt)
    return ids, start


def _as_prompts(input_ids: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise InputError(f"input_ids must be a LongTensor [batch, seq], got {input_ids.dtype} "
                             f"{list(input_ids.shape)}")
        return input_ids.tolist()
    if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence):
        raise InputError(f"input_ids must be a LongTensor or a list of prompts (lists of token ids), "
                         f"got {type(input_ids).__name__}")
    if input_ids and all(isinstance(t, int) for t in input_ids):
        raise InputError(f"input_ids must be a list of prompts, each a list of token ids; got a flat list "
                         f"of ints {list(input_ids)[:8]!r}: wrap one prompt as [[...]]"[:200])
    bad = next((p for p in input_ids if isinstance(p, (str, bytes))
                or not isinstance(p, (Sequence, torch.Tensor))), None)
    if bad is not None:
        raise InputError(f"input_ids must be a list of prompts, each a list of token ids; "
                         f"got an entry {bad!r}"[:200])
    prompts = [list(p) for p in input_ids]
    if not prompts or any(not p for p in prompts):
        raise InputError("input_ids must hold at least one non-empty prompt")
    if any(isinstance(t, bool) or not isinstance(t, int) for p in prompts for t in p):
        raise InputError("input_ids must hold integer token ids")
    return prompts


SEED_RANGE = (0, 2**64 - 1)


def _integer(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int (bools and non-integral numbers refused), optionally in [minimum, maximum]."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be an integer, got {value!r}") from None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise InputError(f"{name} must be {bounds}, got {number}")
    return number


def _real(name: str, value: Any) -> float:
    """``value`` as a finite float (NaN, Inf, bools and strings refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_finite_logits(logits: torch.Tensor, step: int, dtype: torch.dtype) -> None:
    """logits `[B, V]` float32 (CPU). Raises :class:`NonFiniteError` naming the step and dtype."""
    if bool(torch.isfinite(logits).all()):
        return
    what = "NaN" if bool(torch.isnan(logits).any()) else "Inf"
    hint = "; float16 overflows easily, try bfloat16 or float32" if dtype == torch.float16 else ""
    raise NonFiniteError(f"generation stopped: the logits turned non-finite ({what}) at step {step} "
                         f"(0 = the prompt) in {str(dtype).removeprefix('torch.')}{hint}")


def _prefill(model, ids: torch.Tensor, cache, kv_start: torch.Tensor | None, chunk: int):
    """The prompt through the cache in chunks of ``chunk`` tokens (0: at once); the last chunk's
    output. Every chunk attends (dense or InfLLM-v2 sparse) as one prefill of the prompt would."""
    width = ids.shape[1] if chunk == 0 else chunk
    longest = ids.shape[1] - (int(kv_start.min()) if kv_start is not None else 0)
    for start in range(0, ids.shape[1], width):
        out = model.forward(ids[:, start:start + width], cache=cache, kv_start=kv_start, logits_last_only=True,
                            context_len=longest)
    return out


def generate(model, input_ids: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int = 64, *,
             do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             seed: int | None = None, streamer: Streamer | None = None,
             use_cache: bool = True, decode_graph: bool = False, compiled: bool = False,
             prefill_chunk: int = PREFILL_CHUNK) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt.

    Args:
        input_ids: `[B, T]` LongTensor, or a list of B prompts of any lengths (left-padded here).
        do_sample / temperature / top_k / top_p: None takes generation_config.json's value;
            greedy when do_sample is false or temperature is 0.
        eos_token_id: stop ids in [0, vocab_size); None takes generation_config.json's, else
            config.json's; ``[]`` or ``-1`` never stops early.
        seed: seeds the sampling generator (deterministic sampling); an int in [0, 2**64).
        streamer: called as ``streamer(row, token_id)`` for every new token as it is produced.
        use_cache: False recomputes the whole sequence each step (a check of the cache path).
        decode_graph: replay every decode step from a device graph (CUDA graph / NPUGraph, see
            ``model/decode_graph.py``); cuda and npu only. On the CPU every decode step runs
            through ``model/fast_decode.py`` (the same results as ``model.forward``).
        compiled: CPU, batch 1, dense attention: run the decode steps' decoder layers as an
            AOTInductor package (``model/compiled_decode.py``; built once per model shape, 10-60 s
            and a C++ compiler, then cached); logits within the bounds of hal/ops.py of the eager step's.
        prefill_chunk: feed a longer prompt through the cache this many tokens at a time
            (bounds prefill memory: attention scores are chunk x length, not length^2); 0 = one
            forward. Ignored without the cache.

    Returns:
        The new token ids of each prompt (EOS included when it stopped on one).

    Raises:
        InputError: a bad argument (named with its value). NonFiniteError: the logits turned NaN
        or Inf (the step and the dtype are named; e.g. a float16 overflow).
    """
    defaults = model.generation_defaults
    if do_sample is not None and not isinstance(do_sample, bool):
        raise InputError(f"do_sample must be True, False or None, got {do_sample!r}")
    do_sample = defaults.do_sample if do_sample is None else do_sample
    temperature = defaults.temperature if temperature is None else _real("temperature", temperature)
    top_k = defaults.top_k if top_k is None else _integer("top_k", top_k)
    top_p = defaults.top_p if top_p is None else _real("top_p", top_p)
    max_new_tokens = _integer("max_new_tokens", max_new_tokens)
    if seed is not None:
        seed = _integer("seed", seed, *SEED_RANGE)
    prefill_chunk = _integer("prefill_chunk", prefill_chunk)
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise InputError(f"bad sampling parameters: temperature={temperature} (>= 0), top_p={top_p} "
                         f"(in (0, 1]), top_k={top_k} (>= 0)")
    if not do_sample:
        temperature = 0.0
    if eos_token_id is None:
        eos = set(defaults.eos_token_ids or model.config.eos_token_ids)
    else:
        several = isinstance(eos_token_id, (list, tuple, set, frozenset))
        ids_given = eos_token_id if several else [eos_token_id]
        eos = {_integer("eos_token_id", i, -1, model.config.vocab_size - 1) for i in ids_given}

    if prefill_chunk < 0:
        raise InputError(f"prefill_chunk must be >= 0 (0: one forward), got {prefill_chunk}")
    if decode_graph and not use_cache:
        raise InputError("decode_graph=True needs use_cache=True (the graph decodes from the KV cache)")
    if compiled and (decode_graph or not use_cache or model.device.type != "cpu"):
        raise InputError("compiled=True is the CPU's decode step (use_cache=True, no decode_graph); "
                         f"this call has device {model.device}, use_cache={use_cache}, decode_graph={decode_graph}")
    prompts = _as_prompts(input_ids)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids, kv_start = _left_pad(prompts, pad_id)
    model.check_input_ids(ids, extra=max_new_tokens)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else torch.seed())

    device = model.device
    ids = ids.to(device)
    starts = kv_start.to(device) if bool(kv_start.any()) else None
    cache = model.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens) if use_cache else None
    graph = None
    if decode_graph:
        from model.decode_graph import DecodeGraph

        graph = DecodeGraph(model, cache, kv_start if starts is not None else None)
    elif use_cache and model.device.type == "cpu":
        from model.fast_decode import DecodeStep  # the eager decode with its per-step overhead removed

        graph = DecodeStep(model, cache, kv_start if starts is not None else None, compiled=compiled)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    step_input = ids
    sequence = ids
    tokens = None
    with torch.inference_mode():
        for step in range(max_new_tokens):
            if graph is not None and tokens is not None:
                last = graph.step(tokens).float().cpu()
            else:
                if use_cache:
                    out = _prefill(model, step_input, cache, starts, prefill_chunk) if tokens is None else \
                        model.forward(step_input, cache=cache, kv_start=starts, logits_last_only=True)
                else:
                    out = model.forward(sequence, kv_start=starts, logits_last_only=True)
                last = out.logits[:, -1].float().cpu()
            _check_finite_logits(last, step, model.dtype)
            tokens = model.ops.sample(last, temperature, top_k, top_p, generator).cpu()
            for row, token in enumerate(tokens.tolist()):
                if finished[row]:
                    continue
                outputs[row].append(token)
                if streamer is not None:
                    streamer(row, token)
                if token in eos:
                    finished[row] = True
            if all(finished):
                break
            step_input = tokens[:, None].to(device)
            sequence = torch.cat([sequence, step_input], dim=1)
    return outputs
