"""InfLLM-v2 with real block selection, whole model, against an independent float64 forward
(tests/infllm_reference.py for dense MiniCPM, tests/sala_reference.py for SALA; neither shares
code with model/, hal/ or backends/). A small budget (2 scored blocks of 16 tokens besides the
forced init and local ones) and prompts well past dense_len make the selection decide which
keys are attended: prefill, chunked prefill and decode steps must all match within 1e-4."""
from __future__ import annotations

import pytest
import torch
from infllm_reference import Selection, minicpm_logits
from sala_reference import sala_logits

import hal
from model.synthetic import _config, write_checkpoint

TOL = 1e-4
SPARSE = {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16, "window_size": 32,
          "topk": 4, "use_nope": False, "dense_len": 64}  # budget 6 = block 0 + 3 local/own + 2 scored
PROMPT = [(53 * i * i + 7 * i) % 1000 + 3 for i in range(150)]
STEPS = 56  # decode steps: the kernels they complete reach blocks that are scored, not forced
CHUNK = 40  # chunked prefill: 40 + 40 + 40 + 30 (the first chunk alone is below dense_len)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is faster, and far faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["minicpm", "sala"])
def case(request, tmp_path_factory, one_thread):
    """(model, float64 logits of PROMPT + continuation, the reference's selections, continuation)."""
    root = tmp_path_factory.mktemp("infllm")
    if request.param == "minicpm":
        path = write_checkpoint(root / "m", "tiny", dtype="float32", overrides={"sparse_config": SPARSE})
        forward = minicpm_logits
    else:
        sparse = dict(_config("tiny-sala")["sparse_config"], topk=4)
        path = write_checkpoint(root / "s", "tiny-sala", dtype="float32", overrides={"sparse_config": sparse})
        forward = sala_logits
    model = hal.load_model(path, "cpu", "float32")
    tokens = model.generate([PROMPT], STEPS, do_sample=False, eos_token_id=-1, prefill_chunk=CHUNK)[0]
    log: list[Selection] = []
    ref = forward(path, PROMPT + tokens, sparse=True, log=log)
    return model, ref, log, tokens


def _max_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref).abs().max())


def test_selection_matters_and_has_no_near_ties(case):
    """The precondition of a 1e-4 comparison: blocks are really dropped (past the budget), and the
    float64 scores separate kept from dropped blocks by far more than float32 rounding."""
    _, ref, log, _ = case
    dropping = [s for s in log if s.dropped]
    assert len(dropping) > 200, "the budget covers every block: selection is not under test"
    margin = min(s.margin for s in dropping)
    assert margin > 1e-5, f"a near-tie in block selection (relative gap {margin:.1e})"
    # and it matters: a dense forward differs by far more than the tolerance late in the prompt
    assert ref[100:].std() > 0.1


def test_prefill_matches(case):
    model, ref, _, _ = case
    ours = model.logits(torch.tensor([PROMPT]))[0]
    assert _max_diff(ours, ref[:len(PROMPT)]) <= TOL


def test_chunked_prefill_matches(case):
    """The model's chunked path (cache, context_len = the prompt, as model.generation does)."""
    model, ref, _, _ = case
    cache = model.new_cache(1, len(PROMPT) + STEPS)
    for start in range(0, len(PROMPT), CHUNK):
        chunk = torch.tensor([PROMPT[start:start + CHUNK]])
        out = model.forward(chunk, cache=cache, context_len=len(PROMPT)).logits[0]
        assert _max_diff(out, ref[start:start + chunk.shape[1]]) <= TOL, f"chunk at {start}"


def test_decode_steps_match(case):
    """One-token steps through the cache (kernels appended per step) after a one-shot prefill;
    generate's greedy tokens (chunked prefill) are the reference's argmax at every step."""
    model, ref, _, tokens = case
    n = len(PROMPT)
    cache = model.new_cache(1, n + STEPS)
    model.forward(torch.tensor([PROMPT]), cache=cache)
    for i, token in enumerate(tokens):
        out = model.forward(torch.tensor([[token]]), cache=cache).logits[0, -1]
        assert _max_diff(out, ref[n + i]) <= TOL, f"decode step {i}"
    assert tokens == ref[n - 1:n - 1 + STEPS].argmax(-1).tolist()


def test_left_padded_batch_matches_each_row(case):
    """Batch of two prompts (the shorter left-padded): each row is its own sequence."""
    model, ref, _, _ = case
    short = PROMPT[:110]
    ids = torch.tensor([PROMPT, [0] * (len(PROMPT) - len(short)) + short])
    starts = torch.tensor([0, len(PROMPT) - len(short)])
    out = model.forward(ids, kv_start=starts).logits
    assert _max_diff(out[0], ref[:len(PROMPT)]) <= TOL
    # row 1 holds a prefix of row 0's prompt: its logits are the reference's first 110 rows
    assert _max_diff(out[1, -len(short):], ref[:len(short)]) <= TOL
