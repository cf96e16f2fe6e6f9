"""The fast CPU decode step (model/fast_decode.py) against the eager path it replaces,
``model.forward`` one token at a time: the same logits (bitwise, float32), greedy tokens and
cache contents (keys, values, lightning states, InfLLM-v2 kernels), on a dense, a SALA
(lightning) and an InfLLM-v2 sparse checkpoint, and the dense one in bfloat16 (its lm_head packed
for cpu.fbgemm), batch 1 and batch 3 with left padding, and with eager steps between fast ones;
its ``cpu.decode`` ops against the everyday ones on the layouts the model gives them (the float32
cache copies, ``Float32Cache``, bitwise against attention_decode on the cache itself)."""
from __future__ import annotations

import pytest
import torch

import hal
from backends.cpu.decode import Float32Cache, RotaryStep, kv_write_decode_cpu, rotary_decode_cpu
from backends.cpu.ops import attention_decode_cpu, kv_write_cpu, rotary_cpu
from hal.errors import InputError
from model.fast_decode import DecodeStep
from model.synthetic import _config, write_checkpoint

# InfLLM-v2 scaled down (as tests/test_sparse_model.py): sparse from 64 keys, so decode crosses it
SPARSE = {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16, "window_size": 32,
          "topk": 3, "use_nope": False, "dense_len": 64}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    sala_sparse = dict(_config("tiny-sala")["sparse_config"], dense_len=64)
    folders = {
        "tiny": write_checkpoint(root / "tiny", "tiny", dtype="float32"),
        "tiny-sala": write_checkpoint(root / "sala", "tiny-sala", dtype="float32",
                                      overrides={"sparse_config": sala_sparse}),
        "sparse": write_checkpoint(root / "sparse", "tiny", dtype="float32", overrides={"sparse_config": SPARSE}),
    }
    models = {name: hal.load_model(folder, "cpu", "float32") for name, folder in folders.items()}
    # bfloat16: the lm_head packed for cpu.fbgemm (backends/cpu/logits_fp16.py), which the step keeps
    models["tiny-bf16"] = hal.load_model(folders["tiny"], "cpu", "bfloat16")
    assert models["tiny-bf16"].bound_ops["logits"] == "cpu.fbgemm" and models["tiny-bf16"].head is not None
    return models


def _prompts(batch: int) -> list[list[int]]:
    lengths = [58, 41, 50][:batch]  # the sparse models cross dense_len=64 while decoding
    return [[(37 * i + 11 * row) % 900 + 3 for i in range(n)] for row, n in enumerate(lengths)]


def _decode(model, prompts, steps: int, fast: bool):
    """Prefill through forward, then ``steps`` greedy steps: the eager forward or the fast step.
    Returns (logits [steps, B, V], tokens [steps, B], cache)."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(p)
    kv_start = torch.tensor([longest - len(p) for p in prompts]) if len(prompts) > 1 else None
    cache = model.new_cache(len(prompts), longest + steps)
    logits, tokens = [], []
    with torch.inference_mode():
        out = model.forward(ids, cache=cache, kv_start=kv_start, logits_last_only=True)
        token = out.logits[:, -1].argmax(-1)
        step = DecodeStep(model, cache, kv_start) if fast else None
        for _ in range(steps):
            if fast:
                last = step.step(token)
            else:
                last = model.forward(token[:, None], cache=cache, kv_start=kv_start, logits_last_only=True).logits[:, -1]
            token = last.argmax(-1)
            logits.append(last.clone())
            tokens.append(token)
    return torch.stack(logits), torch.stack(tokens), cache


def _cache_tensors(cache) -> list[torch.Tensor]:
    out = [t for t in cache.keys + cache.values if t is not None]
    for group in (cache.states, cache.kernels, cache.coarse):
        out += [group[i] for i in sorted(group)]
    return out


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", ["tiny", "tiny-sala", "sparse", "tiny-bf16"])
def test_fast_step_equals_eager_forward(models, name, batch):
    model = models[name]
    prompts = _prompts(batch)
    steps = 24
    eager_logits, eager_tokens, eager_cache = _decode(model, prompts, steps, fast=False)
    fast_logits, fast_tokens, fast_cache = _decode(model, prompts, steps, fast=True)
    if model.config.sparse is not None:  # the steps cross into sparse attention
        assert model.config.sparse.applies(int(fast_cache.lengths.max()))
        assert not model.config.sparse.applies(max(len(p) for p in prompts))
    assert torch.equal(fast_tokens, eager_tokens)
    assert torch.equal(fast_logits, eager_logits), (fast_logits - eager_logits).abs().max()
    assert torch.equal(fast_cache.lengths, eager_cache.lengths)
    for fast_t, eager_t in zip(_cache_tensors(fast_cache), _cache_tensors(eager_cache), strict=True):
        assert torch.equal(fast_t, eager_t)


def test_generate_on_cpu_decodes_as_the_eager_loop(models):
    model = models["tiny"]
    prompts = _prompts(3)
    _, eager_tokens, _ = _decode(model, prompts, 10, fast=False)
    out = model.generate(prompts, max_new_tokens=11, do_sample=False, eos_token_id=[])
    # generate's first token comes from the prompt, then 10 decode steps
    assert [row[1:] for row in out] == eager_tokens.t().tolist()


def _rewound_decode(model, prompt: list[int], schedule: str) -> torch.Tensor:
    """Greedy steps after ``prompt`` per ``schedule``: ``f`` a fast step, ``e`` an eager forward step,
    ``r`` the cache rewound to the prompt (its length and lengths put back, the next steps
    overwrite the slots after it). Returns the logits of the steps [steps, 1, V]."""
    cache = model.new_cache(1, len(prompt) + len(schedule))
    logits = []
    with torch.inference_mode():
        first = model.forward(torch.tensor([prompt]), cache=cache, logits_last_only=True).logits[:, -1].argmax(-1)
        length, lengths = cache.length, cache.lengths.clone()
        step = DecodeStep(model, cache)
        token = first
        for what in schedule:
            if what == "r":
                cache.length, cache.lengths, token = length, lengths.clone(), (first + 1) % 900
                continue
            last = step.step(token) if what == "f" else \
                model.forward(token[:, None], cache=cache, logits_last_only=True).logits[:, -1]
            token = last.argmax(-1)
            logits.append(last.clone())
    return torch.stack(logits)


def test_eager_steps_and_a_rewind_between_fast_steps_decode_as_the_eager_loop(models):
    """model.forward writing the cache between fast steps, also over slots a fast step wrote (the
    bfloat16 step's float32 copies must not go stale): the same logits as eager steps throughout."""
    model = models["tiny-bf16"]
    prompt = _prompts(1)[0]
    fast = _rewound_decode(model, prompt, "fefffrefff")
    assert torch.equal(fast, _rewound_decode(model, prompt, "eeeeereeee"))


def test_step_binds_the_decode_ops_and_keeps_the_rest(models):
    model = models["tiny"]
    step = DecodeStep(model, model.new_cache(1, 8))
    assert step.bound_ops["kv_write"] == "cpu.decode" and step.bound_ops["rotary"] == "cpu.decode"
    assert all(step.bound_ops[op] == model.bound_ops[op] for op in model.bound_ops if op not in ("kv_write", "rotary"))
    assert model.bound_ops["kv_write"] == model.bound_ops["rotary"] == "cpu.torch"  # the eager path's binding
    # a bfloat16 cache: attention_decode reads the float32 copies kv_write keeps
    bf16 = models["tiny-bf16"]
    assert DecodeStep(bf16, bf16.new_cache(1, 8)).bound_ops["attention_decode"] == "cpu.decode"
    assert bf16.bound_ops["attention_decode"] == "cpu.torch"


def test_step_keeps_what_prefer_chose(tmp_path):
    """prefer={"attention_decode": "cpu.torch"} is the opt-out of the float32 KV copies: the step
    keeps cpu.torch there (and still swaps the ops the caller left alone), with the same logits."""
    folder = write_checkpoint(tmp_path / "tiny", "tiny", dtype="float32")
    plain = hal.load_model(folder, "cpu", "bfloat16", prefer={"attention_decode": "cpu.torch"})
    step = DecodeStep(plain, plain.new_cache(1, 8))
    assert step.bound_ops["attention_decode"] == "cpu.torch" and step.bound_ops["rotary"] == "cpu.decode"
    assert plain.ops.record["attention_decode"].preferred and not plain.ops.record["rotary"].preferred
    copies = hal.load_model(folder, "cpu", "bfloat16")
    assert DecodeStep(copies, copies.new_cache(1, 8)).bound_ops["attention_decode"] == "cpu.decode"
    (a, ta, _), (b, tb, _) = (_decode(m, _prompts(1), 3, fast=True) for m in (plain, copies))
    assert torch.equal(a, b) and torch.equal(ta, tb)


def test_step_refuses_a_foreign_cache_and_bad_tokens(models):
    with pytest.raises(InputError, match="not made for this model"):
        DecodeStep(models["tiny-sala"], models["tiny"].new_cache(1, 8))
    step = DecodeStep(models["tiny"], models["tiny"].new_cache(2, 8))
    with pytest.raises(InputError, match=r"tokens must be \[2\], got \[1\]"):
        step.step(torch.tensor([1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "new"), [(1, 1), (3, 1), (2, 5)])
def test_rotary_in_one_pass_equals_rotary_on_qkv_views(dtype, batch, new):
    heads, kv_heads, d = 6, 2, 16
    g = torch.Generator().manual_seed(batch * 10 + new)
    qkv = torch.randn(batch, new, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    q, k, _ = qkv.split((heads * d, kv_heads * d, kv_heads * d), dim=-1)
    q, k = q.view(batch, new, heads, d), k.view(batch, new, kv_heads, d)
    angles = torch.rand(batch, new, d, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    fast_q, fast_k = rotary_decode_cpu(q, k, cos, sin)
    ref_q, ref_k = rotary_cpu(q, k, cos, sin)
    assert fast_q.data_ptr() != ref_q.data_ptr()
    assert torch.equal(fast_q, ref_q) and torch.equal(fast_k, ref_k)
    # the step's rotary: tables made for the first layer's cos/sin, new ones for other tensors
    step = RotaryStep()
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(step(q, k, cos, sin), (ref_q, ref_k)))
    other = torch.rand(batch, new, d, generator=g) * 6
    assert all(torch.equal(a, b) for a, b in zip(step(q, k, other.cos(), other.sin()),
                                                 rotary_cpu(q, k, other.cos(), other.sin())))
    # not adjacent (k first, or separate tensors): the two-pass rotary
    swapped_q, swapped_k = rotary_decode_cpu(k.expand(batch, new, kv_heads, d), q, cos, sin)
    assert torch.equal(swapped_k, rotary_cpu(k, q, cos, sin)[1])


def test_kv_write_with_host_slots_equals_kv_write_with_and_without_skips():
    g = torch.Generator().manual_seed(3)
    caches = [torch.randn(2, 128, 2, 8, generator=g) for _ in range(2)]
    k, v = torch.randn(2, 4, 2, 8, generator=g), torch.randn(2, 4, 2, 8, generator=g)
    cases = [(torch.tensor([[5, 6, 7, 8], [0, 1, 2, 3]]), k, v), (torch.tensor([[-1, -1, 0, 1], [9, 10, 11, 12]]), k, v),
             # one token per row: one shared slot (the view copy), different slots, a skipped row
             (torch.tensor([[7], [7]]), k[:, 1:2], v[:, 2:3]), (torch.tensor([[7], [3]]), k[:, :1], v[:, :1]),
             (torch.tensor([[-1], [4]]), k[:, :1], v[:, :1])]
    for slots, k, v in cases:
        fast = [c.clone() for c in caches]
        ref = [c.clone() for c in caches]
        kv_write_decode_cpu(*fast, k, v, slots)
        kv_write_cpu(*ref, k, v, slots)
        assert all(torch.equal(a, b) for a, b in zip(fast, ref))
        assert not torch.equal(fast[0], caches[0])


def test_float32_copies_attention_equals_attention_on_the_cache():
    """A bf16 cache written as decode writes it (a prompt, then one token per row per step: rows
    of one length into one shared slot, then rows of different lengths with the shorter one's
    padding tail read too): attention over the float32 copies, which convert only what they do
    not hold yet, equals attention_decode on the cache itself after every step, bitwise; also
    after an earlier slot is rewritten and the copies told to ``forget``. (Against the float32
    reference: tests/ops, ``cpu.decode``.)"""
    g = torch.Generator().manual_seed(5)
    caches = [(torch.randn(2, 128, 2, 16, generator=g) * 3).bfloat16() for _ in range(2)]
    for cache in caches:
        cache[:, 20:] = 0  # never written: what a new cache holds
        cache[1, 12:] = 0  # row 1's prompt is 12 tokens long
    q = torch.randn(2, 1, 4, 16, generator=g).bfloat16()
    copies = Float32Cache()

    def write(seed: int, slots: list[list[int]]) -> None:
        k, v = (torch.randn(2, 1, 2, 16, generator=torch.Generator().manual_seed(seed + i)).bfloat16() for i in (0, 1))
        kv_write_decode_cpu(*caches, k, v, torch.tensor(slots))

    def same(lengths: list[int]) -> None:
        kv_lens = torch.tensor(lengths)
        assert torch.equal(copies(q, *caches, kv_lens, 0.25), attention_decode_cpu(q, *caches, kv_lens, 0.25))

    same([20, 12])  # the prompts: converted at the first call
    for i in range(3):
        write(i, [[20 + i], [12 + i]])
        same([21 + i, 13 + i])
    write(7, [[5], [5]])  # an earlier slot rewritten: the copies are told to forget
    copies.forget()
    same([23, 15])
    for cache in caches:  # rows of one length: one shared slot per step
        cache[1, :23] = cache[0, :23]
    copies.forget()
    for slot in (23, 24):
        write(slot, [[slot], [slot]])
        same([slot + 1, slot + 1])
