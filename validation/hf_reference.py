"""``--reference hf``: transformers' AutoModelForCausalLM with the checkpoint's own remote code,
on CPU in float32, as the judge instead of our reference ops. Runs third-party Python from the
checkpoint folder, so only with ``--trust-remote-code``."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from hal.errors import CheckpointError, InputError


def remote_code_files(folder: Path) -> list[str]:
    """The ``.py`` files config.json's ``auto_map`` names for AutoModelForCausalLM and AutoConfig."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / 'config.json'}: cannot read: {exc}") from None
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not isinstance(auto_map, dict):
        return []
    names = []
    for key in ("AutoConfig", "AutoModelForCausalLM"):
        target = auto_map.get(key)
        if isinstance(target, str) and "." in target:
            names.append(target.rsplit(".", 1)[0].split("--")[-1] + ".py")
    return names


def check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """Raise :class:`InputError` (one line) unless the HF reference may and can run."""
    if not trust_remote_code:
        raise InputError("--reference hf runs the checkpoint's own Python code (auto_map modeling files) "
                         "with transformers; pass --trust-remote-code to allow it, "
                         "or use --reference cpu-fp32")
    names = remote_code_files(folder)
    missing = [n for n in names if not (folder / n).is_file()]
    if not names or missing:
        what = ", ".join(missing) if missing else "no auto_map in config.json"
        raise InputError(f"--reference hf: {folder} has no remote code files ({what} missing); synthetic "
                         "checkpoints ship none: use --reference cpu-fp32 (our float32 CPU reference)")


class HFReference:
    """The transformers model as a judge: :meth:`run` returns logits and hidden states shaped like
    ours. HF's last hidden state has the final norm applied, so that entry is None (not comparable)."""

    name = "hf"

    def __init__(self, folder: Path):
        from transformers import AutoModelForCausalLM

        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                str(folder), trust_remote_code=True, dtype=torch.float32).eval()
        except Exception as exc:  # noqa: BLE001 - third-party code: any failure is one line
            first = (str(exc).strip().splitlines() or [""])[0]
            raise CheckpointError(f"--reference hf: transformers could not load {folder}: "
                                  f"{type(exc).__name__}: {first}") from None
        self.bound_ops = {"model": f"transformers {type(self.model).__name__} (remote code, cpu float32)"}

    @torch.inference_mode()
    def run(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """ids `[1, T]` -> (logits `[T, V]` float32, L+1 hidden states `[1, T, E]`, last None)."""
        out = self.model(input_ids=ids, output_hidden_states=True, use_cache=False)
        hidden: list[torch.Tensor | None] = [h.float() for h in out.hidden_states]
        hidden[-1] = None
        return out.logits[0].float(), hidden
