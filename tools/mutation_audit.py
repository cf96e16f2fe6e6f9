"""Mutation audit: does the test suite catch small, realistic bugs?

Each mutation replaces one exact snippet of one file (or several, all in one mutation) in a
fresh temporary copy of the repository (the files git tracks plus untracked, not-ignored ones),
then runs the mutation's chosen tests (or, with ``--full``, the whole suite) there. A mutation is
*caught* when pytest fails; the report names the failing tests. A snippet that no longer occurs
exactly once is reported as *stale* (the code moved on: update the list). Not part of CI: a
full run takes minutes on 2 cores (see CONTRIBUTING.md).

    python tools/mutation_audit.py                  # every mutation, its chosen tests
    python tools/mutation_audit.py --only 1,4,9     # some of them (numbers from --list)
    python tools/mutation_audit.py --full           # the whole suite per mutation (slow)
    python tools/mutation_audit.py --list
    python tools/mutation_audit.py --markdown out.md
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """file: path from the repository root. edits: (old snippet, new snippet) pairs, each old one
    occurring exactly once. tests: pytest arguments (files or node ids) that should catch it."""

    file: str
    edits: tuple[tuple[str, str], ...]
    description: str
    tests: tuple[str, ...]


def _m(file: str, old: str, new: str, description: str, *tests: str) -> Mutation:
    return Mutation(file, ((old, new),), description, tests)


SPARSE_TESTS = ("tests/test_infllm_independent.py", "tests/test_sparse_model.py", "tests/test_sala.py",
                "tests/validation/test_compare_sparse.py")
OP_TESTS = ("tests/ops", "tests/test_tolerances.py")
INFLLM_OP_TESTS = ("tests/ops/test_infllm_select_blocks.py", "tests/ops/test_infllm_semantics.py",
                   "tests/test_infllm_independent.py")
SAMPLE_TESTS = ("tests/test_sampling_distribution.py", "tests/ops/test_sample.py", "tests/test_generation.py")
METRIC_TESTS = ("tests/validation/test_metrics.py", "tests/validation/test_metrics_asymmetric.py")
TERNARY_2BIT_TESTS = ("tests/ops/test_ternary_2bit.py", "tests/ops/test_linear_ternary.py")
ST_TESTS = ("tests/test_safetensors_library_files.py", "tests/test_checkpoint.py")

MUTATIONS: tuple[Mutation, ...] = (
    # -- the issue-16 table ---------------------------------------------------------------------
    _m("model/minicpm.py", "g, self.attn_scale)\n", "g, 1.0)\n",
       "InfLLM-v2 block selection scored with scale 1.0 instead of 1/sqrt(D)", *SPARSE_TESTS),
    _m("backends/cpu/ops.py", "scaled = logits / temperature", "scaled = logits",
       "sample_cpu ignores the temperature", *SAMPLE_TESTS),
    _m("backends/cpu/reference/sample.py", "torch.softmax(row[order] / temperature, dim=0)",
       "torch.softmax(row[order], dim=0)", "reference sampler ignores the temperature", *SAMPLE_TESTS),
    _m("model/safetensors_mmap.py", "        with safe_open(str(path), framework=\"pt\"):\n            pass\n",
       "        pass\n", "safetensors header validation (the library's check) removed",
       "tests/test_safetensors_fuzz.py", *ST_TESTS),
    _m("model/safetensors_mmap.py", "if end - begin != nbytes or begin < 0 or data_start + end > size:",
       "if False:", "our own offset / size check removed (the library's check still runs first)", *ST_TESTS),
    _m("model/safetensors_mmap.py", '"F16": torch.float16, "BF16": torch.bfloat16',
       '"F16": torch.bfloat16, "BF16": torch.float16', "safetensors F16 and BF16 swapped in the dtype table",
       *ST_TESTS),
    _m("validation/metrics.py", "return int(ref.argmax()) in torch.topk(dev, k).indices.tolist()",
       "return int(dev.argmax()) in torch.topk(ref, k).indices.tolist()",
       "top_inclusion: reference and device swapped", *METRIC_TESTS),
    _m("validation/metrics.py", "idx = torch.topk(p_ref, k).indices", "idx = torch.topk(p_dev, k).indices",
       "topk_abs_errors: the device's top-k instead of the reference's", *METRIC_TESTS),
    _m("model/gptq.py", ".float()[groups]  # [K, N]", ".float()[torch.zeros_like(groups)]  # [K, N]",
       "GPTQ dequantize takes every zero point from group 0", "tests/test_gptq.py", "tests/test_gptq_groups.py"),
    Mutation("hal/ops.py", (('_ELEMENTWISE = {"float32": 1e-10,', '_ELEMENTWISE = {"float32": 1e-5,'),
                            ('_REDUCTION = {"float32": 1e-10,', '_REDUCTION = {"float32": 1e-5,')),
             "float32 NMSE tolerance of elementwise and reduction ops 1e-10 -> 1e-5", OP_TESTS),
    # -- more of the same kind --------------------------------------------------------------------
    _m("backends/cpu/infllm.py", "forced = (c < g.init_blocks) | (c >= qb - g.local_blocks)",
       "forced = (c < g.init_blocks) | (c > qb - g.local_blocks)",
       "InfLLM-v2 (torch op): one local block too few forced", *INFLLM_OP_TESTS),
    _m("backends/cpu/reference/infllm.py", "if c < g.init_blocks or c >= qb - g.local_blocks:",
       "if c < g.init_blocks or c > qb - g.local_blocks:",
       "InfLLM-v2 (reference op): one local block too few forced", *INFLLM_OP_TESTS),
    _m("backends/cpu/infllm.py", "lse = torch.where(coarse_vis.any(dim=-1), lse_coarse, lse_fine)",
       "lse = lse_fine", "InfLLM-v2 normaliser from the fine kernels instead of the coarse ones",
       *INFLLM_OP_TESTS),
    # (the same off-by-one on the fine kernels is an equivalent mutant: a fine kernel ending at
    # the query's position only scores blocks that are forced anyway)
    _m("backends/cpu/infllm.py", "coarse_vis = (coarse_end[None, None, :] <= pos[:, :, None])",
       "coarse_vis = (coarse_end[None, None, :] < pos[:, :, None])",
       "InfLLM-v2: a coarse kernel ending at the query's own position left out of the normaliser",
       *INFLLM_OP_TESTS),
    _m("model/minicpm.py", "                ops.infllm_append_kernel(kernels, keys, kv_lens, size, stride)",
       "                pass", "decode steps never append semantic kernels (stale kernels)",
       "tests/test_infllm_independent.py", "tests/test_sparse_model.py"),
    _m("model/generation.py", "context_len=longest)", "context_len=0)",
       "chunked prefill decides dense/sparse per chunk, not on the whole prompt",
       "tests/test_infllm_independent.py", "tests/test_generation.py", "tests/test_sparse_model.py"),
    Mutation("model/rope.py", (("(emb.cos() * self.mscale)", "(emb.cos())"),
                               ("(emb.sin() * self.mscale)", "(emb.sin())")),
             "LongRoPE mscale not applied", ("tests/test_hf_reference.py", "tests/test_rope.py",
                                              "tests/test_infllm_independent.py")),
    _m("backends/cpu/ops.py", "probs = probs.masked_fill(before >= top_p, 0.0)",
       "probs = probs.masked_fill(probs.cumsum(-1) >= top_p, 0.0)",
       "top-p drops the token that crosses the threshold", *SAMPLE_TESTS),
    _m("validation/metrics.py", "    p = p_ref.double()\n    q = p_dev.double().clamp_min(eps)",
       "    p = p_dev.double()\n    q = p_ref.double().clamp_min(eps)", "KL divergence direction swapped",
       *METRIC_TESTS),
    _m("model/gptq.py", "_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)",
       "_SHIFTS = torch.arange(28, -4, -4, dtype=torch.int32)", "GPTQ nibbles read high first",
       "tests/test_gptq.py", "tests/test_gptq_groups.py"),
    _m("backends/cpu/ternary2.py", "torch.bitwise_left_shift(codes, 2, out=words[n:])",
       "torch.bitwise_left_shift(codes, 1, out=words[n:])", "2-bit ternary: second half expanded with a wrong shift",
       *TERNARY_2BIT_TESTS),
    _m("backends/cpu/ternary2.py", "return (flat[:half] | (flat[half:] >> 2)).view(torch.int32)",
       "return (flat[:half] | (flat[half:] >> 4)).view(torch.int32)", "2-bit ternary: second half stored shifted too far",
       *TERNARY_2BIT_TESTS),
    _m("backends/cpu/ternary2.py", "return y * chunk.scales if weight.per_row else y", "return y",
       "2-bit ternary: per-row scales not applied", *TERNARY_2BIT_TESTS),
    _m("backends/cpu/ternary2.py", "sz = torch.stack((chunk.scales * 0.25, chunk.scales), dim=-1)",
       "sz = torch.stack((chunk.scales * 0.25, chunk.scales * 0), dim=-1)",
       "2-bit ternary: grouped zero left out (codes read as t - 1)", *TERNARY_2BIT_TESTS),
    _m("backends/cpu/ternary2.py", "        codes[:stop - start] += 4 * t", "        codes[:stop - start] += 4 * t.flip(1)",
       "2-bit ternary: codes packed in reversed column order", *TERNARY_2BIT_TESTS),
    _m("backends/cpu/logits_fp16.py", "    return FP16_TOP_EXPONENT - (exponent - 1)", "    return 0",
       "fbgemm lm_head packed without its power-of-two scale", "tests/ops/test_logits_fp16.py"),
    _m("backends/cpu/logits_fp16.py", "    if bad:", "    if False:",
       "fbgemm lm_head packed although float16 rounds some values", "tests/ops/test_logits_fp16.py"),
    _m("backends/cpu/logits_fp16.py", "        out.mul_(2.0 ** -weight.shift)", "        pass",
       "fbgemm logits not scaled back", "tests/ops/test_logits.py"),
    _m("model/minicpm.py", ' and ops.record["logits"].impl == head.impl:', ":",
       "packed lm_head handed to another logits implementation", "tests/ops/test_logits_fp16.py"),
)


@dataclass
class Outcome:
    mutation: Mutation
    status: str  # caught | MISSED | stale | error
    failing: list[str]
    seconds: float
    detail: str = ""


def repo_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line and (root / line).is_file()]


def make_copy(root: Path, dest: Path) -> None:
    for name in repo_files(root):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)


def apply(mutation: Mutation, copy: Path) -> str | None:
    """Apply in place; returns why it cannot be applied (stale snippet), or None."""
    path = copy / mutation.file
    if not path.is_file():
        return f"{mutation.file} does not exist"
    text = path.read_text(encoding="utf-8")
    for old, new in mutation.edits:
        count = text.count(old)
        if count != 1:
            return f"{mutation.file}: snippet {old.strip()[:60]!r} occurs {count} times"
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")
    return None


FAILED = re.compile(r"^(FAILED|ERROR) (\S+)")


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, list[str], str]:
    env = dict(os.environ, PYTHONPATH=str(copy), HAL_CACHE_DIR=str(copy / ".hal-cache"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, [], f"timed out after {timeout:.0f} s"
    failing = [m.group(2) for m in map(FAILED.match, proc.stdout.splitlines()) if m]
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    return proc.returncode, failing, tail


def audit(mutation: Mutation, full: bool, timeout: float, tests: tuple[str, ...] | None = None) -> Outcome:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutation-audit-") as tmp:
        copy = Path(tmp)
        make_copy(ROOT, copy)
        why = apply(mutation, copy)
        if why is not None:
            return Outcome(mutation, "stale", [], 0.0, why)
        code, failing, tail = run_tests(copy, () if full else tests or mutation.tests, timeout)
    seconds = time.perf_counter() - started
    if code == 0:
        return Outcome(mutation, "MISSED", [], seconds, tail)
    if code == 1 or failing:
        return Outcome(mutation, "caught", failing, seconds, tail)
    return Outcome(mutation, "error", failing, seconds, f"pytest exit {code}: {tail}")


def markdown(outcomes: list[Outcome], full: bool) -> str:
    lines = [f"Mutation audit ({'whole suite' if full else 'chosen tests'} per mutation)", "",
             "| # | where | injected bug | result | failing tests (count per file) | s |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        index = MUTATIONS.index(o.mutation) + 1
        files: dict[str, int] = {}
        for test in o.failing:
            files[test.split("::")[0]] = files.get(test.split("::")[0], 0) + 1
        tests = ", ".join(f"`{f}` ({n})" for f, n in files.items())
        lines.append(f"| {index} | `{o.mutation.file}` | {o.mutation.description} | {o.status} | "
                     f"{tests or o.detail} | {o.seconds:.0f} |")
    caught = sum(o.status == "caught" for o in outcomes)
    lines += ["", f"{caught} of {len(outcomes)} caught"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/mutation_audit.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated mutation numbers (see --list)")
    parser.add_argument("--full", action="store_true", help="run the whole suite for each mutation")
    parser.add_argument("--tests", nargs="+", help="run these pytest arguments instead of each mutation's own")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per mutation (default 1800)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.list:
        for i, m in enumerate(MUTATIONS, 1):
            print(f"{i:2d}. {m.file}: {m.description}  [{' '.join(m.tests)}]")
        return 0
    chosen = list(MUTATIONS)
    if args.only:
        try:
            chosen = [MUTATIONS[int(n) - 1] for n in args.only.split(",")]
        except (ValueError, IndexError):
            print(f"error: --only takes numbers 1..{len(MUTATIONS)} separated by commas, got {args.only!r}",
                  file=sys.stderr)
            return 2
    outcomes = []
    for m in chosen:
        print(f"[audit] {MUTATIONS.index(m) + 1}. {m.description} ...", file=sys.stderr, flush=True)
        outcome = audit(m, args.full, args.timeout, tuple(args.tests) if args.tests else None)
        print(f"[audit]    {outcome.status} ({outcome.seconds:.0f} s) {' '.join(outcome.failing[:3])}",
              file=sys.stderr, flush=True)
        outcomes.append(outcome)
    table = markdown(outcomes, args.full)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n", encoding="utf-8")
    return 0 if all(o.status == "caught" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
