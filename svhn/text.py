"""Text for a terminal: exceptions as one line, paths that always print."""

from __future__ import annotations

import os


def one_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def printable(path: object) -> str:
    """A path as text that any stream can encode: bytes that are not UTF-8 in a file name
    (kept by Python as lone surrogates) are shown as \\xNN escapes instead of failing to print."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shown(path: object) -> str:
    """A path as a user would type it: relative to the working directory when inside it."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    rel = os.path.relpath(text)
    return printable(text if rel.startswith("..") else rel)
