"""Generate text from the command line, streaming tokens as they come.

    python -m model.generate --model PATH --device auto "prompt"
    python -m model.generate --chat "What is a NPU?"          # built-in synthetic checkpoint
    python -m model.generate --device npu --decode-graph "prompt"  # decode steps from an NPUGraph
    python -m model.generate --compiled "prompt"   # cpu: decoder layers compiled by AOTInductor
    torchrun --nproc-per-node 2 -m model.generate --tp 2 "prompt"   # tensor parallel over 2 ranks
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from hal.api import MODEL_HELP


class _TextStream:
    """Decodes one row's tokens incrementally and prints only the new text."""

    def __init__(self, tokenizer, out):
        self.tokenizer = tokenizer
        self.out = out
        self.tokens: list[int] = []
        self.printed = ""

    def __call__(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the next token
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.generate",
                                     description="Generate text with MiniCPM.")
    parser.add_argument("prompt", help="the prompt (or the user message with --chat)")
    parser.add_argument("--model", type=Path, default=None,
                        help=f"{MODEL_HELP} (default: the built-in synthetic tiny checkpoint)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or npu (default: auto)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16 or float16 "
                             "(default: float32 on cpu, the checkpoint's dtype elsewhere)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true",
                        help="greedy decoding (default: generation_config.json)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--no-think", action="store_true",
                        help="with --chat: enable_thinking=False (MiniCPM4.1)")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="prompt tokens per prefill forward (default 8192; 0 = the whole prompt at once)")
    parser.add_argument("--decode-graph", action="store_true",
                        help="replay decode steps from a device graph (CUDA graph / NPUGraph); cuda and npu")
    parser.add_argument("--compiled", action="store_true",
                        help="cpu, batch 1: run the decoder layers as an AOTInductor package (built once per "
                             "model shape, 10-60 s, needs a C++ compiler; cached)")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel ranks; run under torchrun --nproc-per-node N (default: 1)")
    args = parser.parse_args(argv)

    from hal import distributed

    distributed.check_world(args.tp)
    try:
        return _generate(args, quiet=distributed.is_quiet_rank())
    finally:
        distributed.shutdown()


def _generate(args: argparse.Namespace, quiet: bool) -> int:
    """The generation; ``quiet`` (a tensor-parallel rank > 0) computes in lockstep but prints nothing."""
    import hal
    from model.synthetic import default_checkpoint
    from model.tokenizer import render_chat

    def say(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr)

    path = args.model if args.model is not None else default_checkpoint()
    parallel = f" (tensor parallel, {args.tp} ranks)" if args.tp > 1 else ""
    say(f"[minicpm-hal] loading {path} on {args.device}{parallel}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hal.load_model(path, device=args.device, dtype=args.dtype, tp=args.tp)
    tokenizer = model.tokenizer
    text = args.prompt
    if args.chat:
        thinking = False if args.no_think else None
        text = render_chat(tokenizer, [{"role": "user", "content": args.prompt}],
                           enable_thinking=thinking)
    # The ChatML template emits no BOS; add_bos_token in tokenizer_config.json adds it here.
    prompt_ids = tokenizer(text)["input_ids"]
    say(f"[minicpm-hal] {model.device} {hal.api.dtype_name(model.dtype)}, prompt {len(prompt_ids)} tokens")
    stream = None if quiet else _TextStream(tokenizer, sys.stdout)
    start = time.perf_counter()
    out = model.generate([prompt_ids], args.max_new_tokens, do_sample=False if args.greedy else None,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         streamer=stream, decode_graph=args.decode_graph, compiled=args.compiled,
                         **({} if args.prefill_chunk is None else {"prefill_chunk": args.prefill_chunk}))
    elapsed = time.perf_counter() - start
    if quiet:
        return 0
    sys.stdout.write("\n")
    sys.stdout.flush()  # a closed pipe shows here, inside run_main, not at interpreter exit
    mode = " (decode graph)" if args.decode_graph else " (compiled decoder layers)" if args.compiled else ""
    mode += f" (tp={args.tp})" if args.tp > 1 else ""
    say(f"[minicpm-hal] {len(out[0])} tokens in {elapsed:.2f} s ({len(out[0]) / elapsed:.1f} tok/s){mode}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit codes as every CLI (``hal/cli.py``): 2 bad input, 3 internal error, 130 / 143 on
    SIGINT / SIGTERM; a closed stdout (``| head -c 3``) ends quietly."""
    from hal.cli import run_main

    return run_main(_main, argv, "model.generate")


if __name__ == "__main__":
    sys.exit(main())
