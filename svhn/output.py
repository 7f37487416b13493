"""Results as documents: JSON streamed as results come, and Markdown tables."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

from svhn import exits
from svhn.text import one_line, printable


class OutputError(exits.UserError):
    """An output that cannot be written; the message names it."""


def plain(obj):
    """JSON-safe: NaN and Inf become None, tensors and paths become lists and strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return plain(obj.tolist())
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return printable(obj)
    if isinstance(obj, str):
        return printable(obj)
    return obj


def dumps(obj, indent: int | None = 2) -> str:
    return json.dumps(plain(obj), indent=indent)


class JsonOutput:
    """A JSON document written as results come: opened (so checked) before the first image,
    each item flushed as it is added, and closed into a valid document whatever ends the run.

    items_key=None writes a bare list of items. Otherwise an object: `head`'s entries, then the
    items (if any) under items_key, then what finish() is given and "complete": true. A run that
    ends before finish() (Ctrl-C, an error) still leaves a valid document, "complete": false:
    the context manager closes it, and so does exits.run for every output still open.
    """

    def __init__(self, path: str | os.PathLike, items_key: str | None = "images", head: dict | None = None) -> None:
        self.path = str(path)
        self.items_key = items_key
        try:
            self.file = sys.stdout if self.path == "-" else open(self.path, "w", encoding="utf-8")
        except OSError as e:
            raise OutputError(f"{printable(self.path)}: cannot write the JSON output ({e.strerror or one_line(e)})") from None
        self.count = 0
        self.entries = 0  # top-level entries of the object written so far
        self.closed = False
        exits.unfinished.append(self._abort)
        self._write("[" if items_key is None else "{")
        for key, value in (head or {}).items():
            self._entry(key, value)

    def _abort(self) -> None:
        self.finish(complete=False)

    def _write(self, text: str) -> None:
        self.file.write(text)
        self.file.flush()

    def _entry(self, key: str, value) -> None:
        text = dumps(value).replace("\n", "\n  ")
        self._write(("," if self.entries else "") + f"\n  {json.dumps(key)}: {text}")
        self.entries += 1

    def add(self, item: dict) -> None:
        if self.items_key is not None and not self.count:
            self._write(("," if self.entries else "") + f"\n  {json.dumps(self.items_key)}: [")
            self.entries += 1
        self._write(("," if self.count else "") + "\n    " + dumps(item, indent=None))
        self.count += 1

    def finish(self, tail: dict | None = None, complete: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        exits.unfinished.remove(self._abort)
        if self.items_key is None:
            self._write("\n]\n")
        else:
            if self.count:
                self._write("\n  ]")
            for key, value in {**(tail or {}), "complete": complete}.items():
                self._entry(key, value)
            self._write("\n}\n")
        if self.file is not sys.stdout:
            self.file.close()

    def __enter__(self) -> "JsonOutput":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is BrokenPipeError:
            return  # nobody is reading any more
        self.finish(complete=False)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
