"""How a script ends: exit statuses, one-line errors and notes on stderr, and `run`, which turns
whatever a user can cause into one line and a status instead of a traceback.

Library code raises UserError (or a subclass: a bad checkpoint, image, labels file, device, ONNX
file, output path); only `run`, which every script's entry point goes through, prints it.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from typing import Callable

import torch

from svhn.text import one_line

EXIT_FAILED = 1  # an image failed, a comparison said FAIL, a disk filled
EXIT_USAGE = 2  # bad flags, no checkpoint, no such device
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM), as schedulers stop jobs


# Outputs still open (svhn.output.JsonOutput registers its closing here): run() closes them all.
unfinished: list[Callable[[], None]] = []


class UserError(Exception):
    """Something the user gave cannot be used; str() is one line naming it. `status` is the exit
    status a script ends with when this reaches it."""

    status = EXIT_USAGE

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so that the same clean-up runs (see on_sigterm)."""


def on_sigterm() -> None:
    """Turn SIGTERM into Terminated in the main thread, so a scheduler's stop is handled like Ctrl-C."""

    def handler(number, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def die(message: str, status: int = EXIT_USAGE) -> None:
    error(message)
    sys.exit(status)


def run(main: Callable[[], int]) -> None:
    """Run a script's main() and exit with its status; what a user can cause (a UserError,
    Ctrl-C, a closed pipe, a batch too large for the memory) ends with one line instead of a
    traceback."""
    for stream in (sys.stdout, sys.stderr):  # a path that the terminal cannot encode prints escaped
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        try:
            sys.exit(main())
        finally:  # whatever ended the run, every output it opened is left a valid document
            for close in list(unfinished):
                try:
                    close()
                except OSError:  # a closed pipe: nobody reads it any more
                    pass
    except UserError as e:
        die(str(e), e.status)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(EXIT_TERMINATED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # `... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_FAILED)
    except (torch.OutOfMemoryError, MemoryError) as e:
        die(f"out of memory ({type(e).__name__}: {one_line(e, 160)}); use a smaller --batch-size", EXIT_FAILED)
    except RuntimeError as e:
        # torch's CPU allocator raises a plain RuntimeError (c10::Error), not OutOfMemoryError,
        # so its own wording is the only sign; anything else is a bug and keeps its traceback.
        if "DefaultCPUAllocator: can't allocate memory" not in str(e):
            raise
        die(f"out of memory on the CPU ({one_line(e, 160)}); use a smaller --batch-size", EXIT_FAILED)
