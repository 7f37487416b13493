"""Writing files so that nothing half-written is ever left under a final name.

Every file a run keeps (checkpoints, training states, ONNX files and their proofs) is written to
a hidden temporary file beside it (`.<name>.<random>.tmp`), flushed to disk, given the mode the
umask gives any new file, and renamed over the final name. A failure (a full disk, an error)
removes the temporary file; a kill cannot, so `remove_leftovers` removes files of that pattern
when a run starts in a folder.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

_LEFTOVER = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # tempfile's 8 random characters


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it, which threads would race


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call write(f) on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                write(f)
            except RuntimeError as e:  # torch.save's zip writer wraps the OSError of a full disk
                cause = e.__cause__ or e.__context__
                if isinstance(cause, OSError):
                    raise cause from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; a kept file follows the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda f: f.write(data))


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that a killed write left in `folder`; returns them."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        if _LEFTOVER.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_writable(folder: str | os.PathLike) -> None:
    """Raise OSError unless a file can be created in `folder`. The probe's name is unique to
    this call, so processes that probe at once do not race."""
    fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
    os.close(fd)
    os.unlink(probe)
