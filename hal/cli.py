"""The wrapper every command-line tool runs under: one exit-code rule and one signal rule.

    def main(argv=None) -> int:
        return run_main(_main, argv, "model.generate")

Exit codes (documented in README.md and validation/README.md):

    0    ok / pass                      (the tool's own return value)
    1    accuracy failure               (the tool's own return value)
    2    bad input, unavailable device  (any :class:`~hal.errors.HalError`, or an OSError with its path)
    3    internal error                 (one line; the full traceback goes to a file the line names)
    130  interrupted by SIGINT (Ctrl-C) (one line, no traceback)
    143  terminated by SIGTERM          (``timeout``, ``kill``: cleaned up exactly like SIGINT)
    141  stdout closed early            (``... | head -c 3``: ends quietly, as a SIGPIPE'd tool does)

SIGTERM is turned into :class:`Terminated`, a ``KeyboardInterrupt``, so every ``finally`` and
``except BaseException`` cleanup (staged report folders, staged checkpoints) runs for it too.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import traceback
from typing import Callable, Sequence

from hal.errors import HalError

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM, EXIT_PIPE = 128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + 13


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised where the program is, like Ctrl-C, so cleanups run."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def os_error_line(exc: OSError) -> str:
    """``path: reason`` for an OSError (the bare ``[Errno 28] ...`` names no file)."""
    reason = exc.strerror or first_line(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


def write_traceback(prog: str) -> str:
    """The current exception's full traceback into a file in the temp dir; returns its path."""
    try:
        with tempfile.NamedTemporaryFile("w", prefix=f"minicpm-hal-{prog.replace('.', '-')}-",
                                         suffix=".traceback.txt", delete=False, encoding="utf-8") as fh:
            fh.write(traceback.format_exc())
            return fh.name
    except OSError as exc:
        return f"(not written: {os_error_line(exc)})"


def _quiet_stdout() -> None:
    """stdout's reader is gone: point fd 1 at /dev/null so the interpreter's last flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # in-process callers: stdout is not a file
        pass


def _say(line: str) -> None:
    from hal.distributed import is_quiet_rank

    if is_quiet_rank():  # a tensor-parallel rank > 0: rank 0 prints the line for every rank
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
             prog: str = "minicpm-hal") -> int:
    """Run a tool's ``main(argv)`` under the exit-code rule (module docstring); returns the code."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return main(argv)
    except HalError as exc:
        _say(f"error: {first_line(exc)}")
        return EXIT_USAGE
    except Terminated:
        _say(f"{prog}: terminated (SIGTERM)")
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        _say(f"{prog}: interrupted")
        return EXIT_SIGINT
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_PIPE
    except OSError as exc:
        _say(f"error: {os_error_line(exc)}")
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - the top of the program: report, never a bare traceback
        where = write_traceback(prog)
        _say(f"internal error: {type(exc).__name__}: {first_line(exc)} (full traceback: {where})")
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
