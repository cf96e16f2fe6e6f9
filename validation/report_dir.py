"""Writing a report folder atomically: everything goes into a hidden temporary sibling that is
renamed into place at the end, so a failed run leaves no half-written report."""
from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
from pathlib import Path

from hal.errors import InputError


def default_dir(device: str, dtype: str, now: _dt.datetime | None = None) -> Path:
    """``reports/<device>-<dtype>-<YYYYmmdd-HHMMSS>`` (relative to the working directory)."""
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path("reports") / f"{device}-{dtype}-{stamp}"


class StagedDir:
    """``stage = StagedDir(final)``: write into ``stage.path``; ``stage.commit()`` renames it to
    ``final``; ``stage.discard()`` removes it. Creating it checks the destination up front
    (not an existing non-empty folder, parent writable) and raises :class:`InputError`."""

    def __init__(self, final: Path):
        self.final = Path(final)
        blocker = next((p for p in self.final.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise InputError(f"cannot write the report to {self.final}: {blocker} is a file, not a folder")
        if self.final.exists() and (not self.final.is_dir() or any(self.final.iterdir())):
            raise InputError(f"report folder {self.final} already exists and is not empty")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".partial",
                                              dir=self.final.parent))
        except OSError as exc:
            raise InputError(f"cannot write the report to {self.final}: {exc.strerror or exc}") from None

    def commit(self) -> Path:
        try:
            if self.final.is_dir():
                self.final.rmdir()  # empty by the check above
            self.path.rename(self.final)
        except OSError as exc:
            self.discard()
            raise InputError(f"cannot move the report into {self.final}: {exc.strerror or exc}") from None
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
