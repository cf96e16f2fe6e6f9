"""The prompts ``validation.compare`` runs: the seven of seed 004 by default, or a file."""
from __future__ import annotations

import json
from pathlib import Path

from hal.errors import InputError
from model.synthetic_tokenizer import DEMO_PROMPTS

DEFAULT_PROMPTS: tuple[str, ...] = DEMO_PROMPTS
"""Seed 004's seven completion prompts, in its order."""


def read_text(file: Path, label: str) -> str:
    """The UTF-8 text of ``file``; one-line InputError starting with ``label`` when it is missing,
    unreadable or not UTF-8 (shared by the prompts file and the corpus)."""
    if not file.is_file():
        raise InputError(f"{label}: not found")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{label}: not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{label}: cannot read: {exc.strerror or exc}") from None


def load_prompts(path: str | Path | None) -> list[str]:
    """Prompts from ``path``: a ``.json`` file holding a list of strings, or a text file with one
    prompt per line (blank lines and lines starting with ``#`` are skipped). None: the defaults.

    Raises :class:`InputError` (one line, naming the file) when it is missing, unreadable, not
    UTF-8, malformed or holds no prompt."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    file = Path(path)
    text = read_text(file, f"prompts file {file}")
    if file.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"prompts file {file}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise InputError(f"prompts file {file}: expected a JSON list of strings")
        prompts = [p for p in data if p.strip()]
    else:
        prompts = [line.rstrip("\r") for line in text.split("\n")]
        prompts = [p for p in prompts if p.strip() and not p.lstrip().startswith("#")]
    if not prompts:
        raise InputError(f"prompts file {file}: holds no prompt")
    return prompts
