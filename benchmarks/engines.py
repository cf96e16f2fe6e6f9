"""The inference stacks the benchmark times, behind one greedy ``generate`` interface.

* :class:`OursEngine`: ``hal.load_model`` + ``model.generate`` (this project).
* :class:`TransformersEngine`: transformers' ``LlamaForCausalLM`` on the same weights (a MiniCPM
  folder through ``benchmarks/hf_llama.py``'s folded Llama, a GGUF file through transformers'
  own GGUF loader), same dtype and device, with ``eager`` or ``sdpa`` attention.
* :class:`LlamaCppEngine`: llama.cpp through llama-cpp-python on the GGUF file (CPU only), in the
  GGUF's own quantisation.

Every engine runs greedy decoding for exactly ``new_tokens`` tokens (no EOS stop) and reports
when the first new token was available, so prefill and decode are told apart from one call.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass
class Generation:
    """One timed greedy call. tokens: the new ids of each prompt (``new_tokens`` each).
    seconds: the whole call. first_token_s: from the call to the first new token (prefill and
    one sampling step)."""

    tokens: list[list[int]]
    seconds: float
    first_token_s: float


class Unavailable(Exception):
    """An engine that cannot run here (not installed, no GGUF, wrong device): the reason."""


def synchronizer(device: str) -> Callable[[], None]:
    from benchmarks.decode_graph import synchronizer as sync

    return sync(device)


def weight_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of distinct storages among ``tensors`` (tied or fused views counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class OursEngine:
    """This project's model, loaded once (or an already ``loaded`` one); ``load_s`` is the time of
    ``hal.load_model``."""

    name = "ours"
    label = "minicpm-hal"

    def __init__(self, path: Path, device: str, dtype: str, loaded: Any = None):
        import hal

        start = time.perf_counter()
        self.model = loaded if loaded is not None else hal.load_model(path, device=device, dtype=dtype)
        self.load_s = time.perf_counter() - start
        self.device = device
        self.max_positions = self.model.config.max_position_embeddings

    def weight_bytes(self) -> int:
        m = self.model
        tensors = [m.embed, m.lm_head, m.final_norm]
        tensors += [t for layer in m.layers for t in vars(layer).values()]
        tables = {id(t): t for t in tensors if hasattr(t, "prepared_bytes")}  # quantized (model/table.py, PreparedLinear)
        return weight_bytes([t for t in tensors if isinstance(t, torch.Tensor)]) + sum(
            t.prepared_bytes for t in tables.values())

    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token costs across the attention layers (keys and values)."""
        cfg = self.model.config
        layers = cfg.num_hidden_layers - len(self.model.lightning_layers)
        element = torch.empty((), dtype=self.model.dtype).element_size()
        return 2 * layers * cfg.num_key_value_heads * cfg.head_dim * element

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Generation:
        sync = synchronizer(self.device)
        first: list[float] = []

        def streamer(row: int, token: int) -> None:
            if not first:
                first.append(time.perf_counter())

        sync()
        start = time.perf_counter()
        out = self.model.generate(prompts, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[],
                                  streamer=streamer)
        sync()
        end = time.perf_counter()
        return Generation(out, end - start, first[0] - start)


class _FirstTokenClock:
    """A transformers streamer that notes when the first new token arrives (the first ``put`` is
    the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def load_transformers(path: Path, dtype: torch.dtype):
    """transformers' LlamaForCausalLM holding ``path``'s weights (a MiniCPM folder or a GGUF file)."""
    if path.suffix == ".gguf":
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                     attn_implementation="sdpa")
        return model.eval()
    from benchmarks.hf_llama import load_folded_llama

    return load_folded_llama(path, dtype, attn_implementation="sdpa")


class TransformersEngine:
    """transformers on the same weights, dtype and device; ``attention`` is ``eager`` or ``sdpa``.
    Two engines may share one loaded model (``loaded``): each sets its attention before it runs."""

    label = "transformers"

    def __init__(self, path: Path, device: str, dtype: torch.dtype, loaded: Any = None, attention: str = "sdpa"):
        from hal.probing import torch_device

        start = time.perf_counter()
        self.model = loaded if loaded is not None else load_transformers(path, dtype).to(torch_device(device))
        self.load_s = time.perf_counter() - start
        self.device = device
        config = self.model.generation_config
        config.eos_token_id = None  # greedy for exactly new_tokens, as ours runs
        config.pad_token_id = 0
        config.do_sample = False
        config.temperature = config.top_p = config.top_k = None
        self.attention = attention

    @property
    def name(self) -> str:
        return f"transformers-{self.attention}"

    def weight_bytes(self) -> int:
        return weight_bytes([p for p in self.model.parameters()])

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Generation:
        from hal.probing import torch_device

        if self.model.config._attn_implementation != self.attention:
            self.model.set_attn_implementation(self.attention)
        longest = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt):] = torch.tensor(prompt)
            mask[row, longest - len(prompt):] = 1
        dev = torch_device(self.device)
        ids, mask = ids.to(dev), mask.to(dev)
        clock = _FirstTokenClock()
        sync = synchronizer(self.device)
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, streamer=clock)
        sync()
        end = time.perf_counter()
        tokens = out[:, longest:].cpu().tolist()
        return Generation(tokens, end - start, (clock.first or end) - start)


@contextlib.contextmanager
def _plain_cpu_buffers(enabled: bool):
    """While constructing a ``Llama``: weights in the plain CPU buffer, no extra buffer types
    (``use_extra_bufts = False``). ggml's AMX weight repacking crashes in ``llama_decode`` on
    some AMX CPUs (tile permission requested on the main thread only: llama.cpp PR #26954);
    llama-cpp-python exposes the flag only through the default model params."""
    import llama_cpp
    import llama_cpp.llama as high_level

    if not enabled:
        yield
        return
    original = llama_cpp.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    high_level.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        high_level.llama_cpp.llama_model_default_params = original


_SMOKE = """
import sys
from pathlib import Path
import llama_cpp
from benchmarks.engines import _plain_cpu_buffers
with _plain_cpu_buffers(sys.argv[2] == "plain"):
    llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
llm.eval([1, 2, 3, 4])
"""


def _smoke_test(path: Path) -> bool:
    """Whether llama.cpp needs plain CPU buffers for this model: loads the GGUF and evaluates 4
    tokens in a child process, with the default buffers and, if that crashes (a native
    segfault takes the child down, not the benchmark), with plain ones. Unavailable if both fail."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    how = ""
    for mode in ("default", "plain"):
        try:
            done = subprocess.run([sys.executable, "-c", _SMOKE, str(path), mode], capture_output=True,
                                  timeout=300, cwd=root)
        except subprocess.TimeoutExpired:
            raise Unavailable("llama-cpp-python did not evaluate 4 tokens within 300 s") from None
        if done.returncode == 0:
            return mode == "plain"
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
    raise Unavailable(f"llama-cpp-python {llama_cpp_version()} crashed evaluating 4 tokens of this model ({how})")


def llama_cpp_version() -> str | None:
    from validation.environment import package_version

    return package_version("llama_cpp_python") or package_version("llama-cpp-python")


class LlamaCppEngine:
    """llama.cpp (llama-cpp-python) on a GGUF file, CPU, one sequence per call, greedy
    (``temp=0``, no repeat penalty). ``plain_buffers``: the weights stay in plain CPU buffers
    because repacked ones crashed here (see :func:`_smoke_test`)."""

    name = "llama.cpp"
    label = "llama.cpp"

    def __init__(self, path: Path, device: str, context: int, threads: int):
        if device != "cpu":
            raise Unavailable("CPU only in this benchmark")
        if path.suffix != ".gguf":
            raise Unavailable("the model is not a GGUF file")
        try:
            import llama_cpp
        except ImportError:
            raise Unavailable("not installed (pip install llama-cpp-python)") from None
        self.plain_buffers = _smoke_test(path)
        start = time.perf_counter()
        with _plain_cpu_buffers(self.plain_buffers):
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_threads=threads,
                                       n_threads_batch=threads, n_batch=512, verbose=False)
        self.load_s = time.perf_counter() - start
        self.size = path.stat().st_size

    def weight_bytes(self) -> int:
        return self.size

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Generation:
        if len(prompts) != 1:
            raise Unavailable("llama-cpp-python's Llama runs one sequence per call")
        tokens: list[int] = []
        first = None
        start = time.perf_counter()
        for token in self.llm.generate(prompts[0], temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                       repeat_penalty=1.0, reset=True):
            if first is None:
                first = time.perf_counter()
            tokens.append(int(token))
            if len(tokens) == new_tokens:
                break
        end = time.perf_counter()
        return Generation([tokens], end - start, (first or end) - start)
