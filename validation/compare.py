"""python -m validation.compare: accuracy of a device against the float32 CPU reference.

Runs the same prompts through the device under test and the reference, compares next-token
distributions at the end of each prompt and at ``--positions`` teacher-forced positions after
it, measures per-layer drift and checks every bound op on this model's shapes. Prints the
Markdown report, writes report.md / report.json / top10.png / drift.png, and exits 0 (pass),
1 (accuracy failure), 2 (bad input, device unavailable) or 3 (internal error: one line naming the
file that holds the traceback); 130 / 143 after SIGINT / SIGTERM, with no report folder left
behind. See validation/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from hal.api import MODEL_HELP, is_gguf
from hal.errors import InputError

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2  # 3 (internal error) and the signal codes: hal/cli.py


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m validation.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="device under test: auto, cpu, cuda, npu (default: auto)")
    p.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16 (default: bfloat16)")
    p.add_argument("--model", type=Path, default=None,
                   help=f"{MODEL_HELP}; default: the built-in synthetic tiny checkpoint")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompts: one per line, or a .json list; default: the seven prompts of seed 004")
    p.add_argument("--top-k", type=int, default=10, help="size of the compared top-k sets (default: 10)")
    p.add_argument("--positions", type=int, default=4, metavar="N",
                   help="also compare N teacher-forced positions after each prompt (default: 4)")
    p.add_argument("--report-dir", type=Path, default=None, metavar="DIR",
                   help="where to write the report (default: reports/<device>-<dtype>-<timestamp>/)")
    p.add_argument("--thresholds", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="pass-rule overrides: kl_mean_factor, top1_prob_rel_err_factor, top1_mismatch_factor, "
                        "near_tie_margin, top1_prob_rel_err_mean (the seed rule's limit), drift_rel_l2, "
                        "ops_must_conform")
    p.add_argument("--allow-fallback", action="store_true",
                   help="run ops the device cannot serve on the CPU reference (listed in the report)")
    p.add_argument("--reference", choices=("cpu-fp32", "cpu-fp32-torch", "hf"), default="cpu-fp32",
                   help="the judge: our float32 CPU reference ops (default), our float32 torch ops (for long "
                        "prompts on big models, where the naive reference ops are too slow) or transformers "
                        "with remote code")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow --reference hf to run the checkpoint's own Python code")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: 1 for models with hidden_size <= 512, whose tiny "
                        "matmuls lose more to thread synchronisation than they gain; else torch's default)")
    p.add_argument("--emulate", action="store_true",
                   help="use the torch_npu emulator for --device npu (reports say EMULATED)")
    p.add_argument("--corpus", nargs="?", const="builtin", default=None, metavar="FILE",
                   help="corpus mode: teacher-force --tokens tokens of FILE (or 'builtin', the default "
                        "without FILE) and report perplexities and KL statistics instead of the prompt verdict")
    p.add_argument("--tokens", type=int, default=1024, metavar="N",
                   help="corpus mode: positions to score (default: 1024)")
    p.add_argument("--decode-graph", action="store_true",
                   help="replay the device's decode steps from a device graph (cuda, npu), as "
                        "generate(decode_graph=True) does; the report names the graph mode")
    p.add_argument("--quantize", default=None, choices=("keep", "dequantize", "ternary"),
                   help="how the device and the reference load quantized linears (hal.load_model's quantize): "
                        "keep (default: packed on the device, decoded in float32 by the reference), "
                        "dequantize, or ternary (pack BitCPM4 fake-quantized linears)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor-parallel ranks of the device under test; run under torchrun --nproc-per-node N "
                        "(every rank compares; rank 0 prints and writes the report; default: 1)")
    p.add_argument("--inject-fault", default=None, metavar="NAME",
                   help="developer option: inject a fault of validation/faults.py into the device "
                        "(e.g. rotary-interleaved) to see the verdict catch it")
    return p


def progress(message: str) -> None:
    from hal.distributed import is_quiet_rank

    if not is_quiet_rank():  # tensor parallel: rank 0 speaks for every rank
        print(f"[compare] {message}", file=sys.stderr, flush=True)


def _json_safe(value: Any) -> Any:
    """Non-finite floats become null (strict JSON); containers are walked."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(report: dict[str, Any], folder: Path) -> list[str]:
    """report.md, report.json, top10.png, drift.png into ``folder``; returns the file names."""
    from validation import plots, report_md

    (folder / "report.md").write_text(report_md.render(report), encoding="utf-8")
    text = json.dumps(_json_safe(report), indent=2, ensure_ascii=False, allow_nan=False)
    (folder / "report.json").write_text(text + "\n", encoding="utf-8")
    plots.plot_topk(report, folder)
    plots.plot_drift(report, folder)
    return ["report.md", "report.json", "top10.png", "drift.png"]


SMALL_HIDDEN = 512


def _set_threads(requested: int | None, model: Path) -> None:
    """Apply ``--threads``; by default one thread for small models (see the option's help)."""
    import torch

    if requested is not None:
        if requested < 1:
            raise InputError(f"--threads must be >= 1, got {requested}")
        torch.set_num_threads(requested)
        return
    from hal.api import checkpoint_config

    if checkpoint_config(model).hidden_size <= SMALL_HIDDEN:
        torch.set_num_threads(1)


def _run(args: argparse.Namespace) -> int:
    from model.gguf_checkpoint import parsed_once

    with parsed_once():  # a GGUF file is parsed once: its config here, then every model loaded from it
        return _compare(args)


def _compare(args: argparse.Namespace) -> int:
    from hal import probing as hal_devices
    from hal.api import dtype_name, parse_dtype
    from validation import harness, passrule, prompts, report_dir

    started = time.perf_counter()
    dtype = dtype_name(parse_dtype(args.dtype))
    thresholds = passrule.parse_overrides(args.thresholds)
    prompt_list = prompts.load_prompts(args.prompts)
    if args.reference != "hf" and args.trust_remote_code:
        raise InputError("--trust-remote-code only applies to --reference hf")
    kind = hal_devices.resolve(args.device)
    if args.model is None:
        from model.synthetic import default_checkpoint

        model = default_checkpoint()
    else:
        model = args.model
        if not model.is_dir() and not is_gguf(model):
            raise InputError(f"--model {model}: checkpoint folder or .gguf file not found")
    _set_threads(args.threads, model)
    settings = harness.Settings(model=model, device=kind, dtype=dtype, prompts=prompt_list,
                                prompts_file=args.prompts, top_k=args.top_k, positions=args.positions,
                                thresholds=thresholds, allow_fallback=args.allow_fallback,
                                reference=args.reference, trust_remote_code=args.trust_remote_code,
                                decode_graph=args.decode_graph, quantize=args.quantize, tp=args.tp)
    if args.decode_graph and (kind == "cpu" or args.corpus is not None):
        raise InputError("--decode-graph needs --device cuda or npu (the cpu has no device graphs) and "
                         "the prompt protocol (not --corpus)")
    check_prompt_lengths(model, prompt_list, args.positions)
    label = f"{kind}-emulated" if "emulated" in hal_devices.probe(kind).description else kind
    if args.inject_fault:
        from validation import faults

        settings.fault = faults.get(args.inject_fault).name
    if args.tp > 1:
        if args.corpus is not None:
            raise InputError("--tp applies to the prompt protocol (not --corpus)")
        return _run_tensor_parallel(settings, args, kind, label, dtype, started)
    stage = report_dir.StagedDir(args.report_dir or report_dir.default_dir(label, dtype))
    try:
        if args.corpus is not None:
            report, names = _run_corpus(args, settings, stage.path)
        else:
            report = harness.run(settings, progress)
            progress("writing the report")
            try:
                names = write_report(report, stage.path)
            except OSError as exc:  # disk full, quota: name the report folder (the bare errno names no file)
                raise InputError(f"cannot write the report to {stage.final}: {exc.strerror or exc}") from None
        final = stage.commit()
    except BaseException:
        stage.discard()
        raise
    print(report_md_text(final))
    print(f"Report: {final}/ ({', '.join(names)}) in {time.perf_counter() - started:.1f} s")
    return EXIT_PASS if report.get("passed", True) else EXIT_FAIL  # corpus mode reports, it does not judge


def _run_tensor_parallel(settings: Any, args: argparse.Namespace, kind: str, label: str, dtype: str,
                         started: float) -> int:
    """Every rank runs the comparison (the device model's collectives need all of them); rank 0
    alone writes and prints the report; every rank returns the same exit code (a failed report
    write on rank 0 fails every rank)."""
    from hal import distributed
    from validation import harness, report_dir

    group = distributed.setup(kind, args.tp)
    report = harness.run(settings, progress)
    final, names, error = None, [], None
    if group.rank == 0:
        stage = None
        try:
            stage = report_dir.StagedDir(args.report_dir or report_dir.default_dir(f"{label}-tp{args.tp}", dtype))
            progress("writing the report")
            try:
                names = write_report(report, stage.path)
            except OSError as exc:
                raise InputError(f"cannot write the report to {stage.final}: {exc.strerror or exc}") from None
            final = stage.commit()
        except Exception as exc:  # noqa: BLE001 - re-raised by agree() here, reported to the other ranks
            error = exc
        except BaseException:
            if stage is not None:
                stage.discard()
            raise
        if error is not None and stage is not None:
            stage.discard()
    group.agree(error)
    if final is not None:
        print(report_md_text(final))
        print(f"Report: {final}/ ({', '.join(names)}) in {time.perf_counter() - started:.1f} s")
    return EXIT_PASS if report.get("passed", True) else EXIT_FAIL


def _run_corpus(args: argparse.Namespace, settings: Any, folder: Path) -> tuple[dict[str, Any], list[str]]:
    from validation import corpus, corpus_md

    report = corpus.run(corpus.CorpusSettings(
        model=settings.model, corpus=args.corpus, tokens=args.tokens, device=settings.device,
        dtype=settings.dtype, reference=settings.reference, trust_remote_code=settings.trust_remote_code,
        allow_fallback=settings.allow_fallback, fault=settings.fault), progress)
    progress("writing the report")
    return report, corpus_md.write(report, folder)


def check_prompt_lengths(model: Path, prompt_list: list[str], positions: int) -> None:
    """Before any weight is loaded: every prompt (+ ``positions`` teacher-forced tokens) must fit
    max_position_embeddings; the error names the prompt by number and text. A GGUF file's
    tokenizer is built while loading, so there the harness's check (after loading) names it."""
    if is_gguf(model):
        return
    from model.config import load_config
    from model.tokenizer import load_tokenizer

    config = load_config(model)
    tokenizer = load_tokenizer(model)
    for index, prompt in enumerate(prompt_list):
        count = len(tokenizer(prompt)["input_ids"])
        if count + max(positions, 0) > config.max_position_embeddings:
            shown = prompt if len(prompt) <= 40 else prompt[:37] + "..."
            raise InputError(f"prompt {index + 1} ({shown!r}) has {count} tokens"
                             + (f" + {positions} teacher-forced positions" if positions > 0 else "")
                             + f", more than max_position_embeddings={config.max_position_embeddings} "
                             f"of {model / 'config.json'}")


def report_md_text(folder: Path) -> str:
    return (folder / "report.md").read_text(encoding="utf-8")


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    emulate_before = os.environ.get("HAL_NPU_EMULATE")
    if args.emulate:
        os.environ["HAL_NPU_EMULATE"] = "1"  # before any device probing
    import torch

    threads = torch.get_num_threads()
    from hal import distributed

    try:
        distributed.check_world(args.tp)
        return _run(args)
    finally:
        distributed.shutdown()
        torch.set_num_threads(threads)  # in-process callers (tests) keep their setting and environment
        if emulate_before is None:
            os.environ.pop("HAL_NPU_EMULATE", None)
        else:
            os.environ["HAL_NPU_EMULATE"] = emulate_before


def main(argv: list[str] | None = None) -> int:
    """The exit-code rule of every CLI (``hal/cli.py``), so in-process callers get the same codes."""
    from hal.cli import run_main

    return run_main(_main, argv, "validation.compare")


if __name__ == "__main__":
    sys.exit(main())
