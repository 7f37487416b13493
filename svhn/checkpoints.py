"""Checkpoint files: reading one as a state dict, finding one (or downloading the published
weights), and writing one atomically. Every way a file can be wrong ends in CheckpointError, one
line that names the file."""

from __future__ import annotations

import os
import pickle
import re
import socket
import stat
from collections import OrderedDict
from pathlib import Path

import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

import localizer
from localizer import Localizer, LocalizerWeightsError
from model import SVHNModel, WeightsError, model_from_state_dict
from svhn.files import write_atomic
from svhn.text import one_line, printable

MODEL_ID = "Genius-Society/svhn"
DOWNLOAD_HINT = (
    "pip install modelscope && modelscope download --model Genius-Society/svhn --include 'model-*.pth' --local_dir checkpoints"
    ", then pass --checkpoint checkpoints (or set SVHN_CHECKPOINT)"
)
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
_CHECKPOINT_NAME = re.compile(r"model-(\d+)\.pth$")
_WRAPPERS = ("state_dict", "model", "model_state_dict")
_LOCALIZER_NAME = re.compile(r"localizer-(\d+)\.pth$")
SHIPPED_LOCALIZER = Path(__file__).resolve().parents[1] / "weights" / "localizer.pth"


class CheckpointError(WeightsError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def normalise_keys(state_dict: dict) -> dict:
    """Strip the prefixes that DataParallel, DDP and torch.compile add to every key (nested, as
    a compiled DDP module writes them: module._orig_mod.)."""
    out = OrderedDict((str(k), v) for k, v in state_dict.items())
    while any(k.startswith(_PREFIXES) for k in out):
        for prefix in _PREFIXES:
            consume_prefix_in_state_dict_if_present(out, prefix)
    return dict(out)


def checkpoint_in_dir(directory: Path, pattern: re.Pattern = _CHECKPOINT_NAME) -> Path:
    """The highest-step model-<step>.pth (or the pattern's name) in a directory."""
    try:
        found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := pattern.search(p.name))]
    except OSError as e:
        raise CheckpointError(f"{printable(directory)}: folder cannot be read ({e.strerror or one_line(e)})") from None
    if not found:
        what = pattern.pattern.replace("(\\d+)", "<step>").replace("\\", "").rstrip("$")
        raise CheckpointError(f"{printable(directory)}: no {what} file in this folder")
    return max(found)[1]


def read_checkpoint(path: Path) -> object:
    """What a checkpoint file holds, read with weights_only=True on the CPU; CheckpointError
    naming the file for a missing, empty, special, junk or pickled-code file."""
    name = printable(path)
    try:
        info = path.stat()
    except OSError as e:
        raise CheckpointError(f"{name}: no such checkpoint file" if isinstance(e, FileNotFoundError) else f"{name}: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
        raise CheckpointError(f"{name}: not a regular file")
    if info.st_size == 0:
        raise CheckpointError(f"{name}: empty file, not a checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(_refusal(path)) from None
    except MemoryError:
        raise CheckpointError(f"{name}: does not fit in memory") from None
    except Exception as e:  # junk makes the unpickler raise anything: KeyError, IndexError, ...
        raise CheckpointError(f"{name}: not a readable PyTorch checkpoint, truncated or corrupt ({type(e).__name__}: {one_line(e, 120)})") from None
    return obj


def load_state_dict(path: str | os.PathLike) -> dict:
    """Read a checkpoint file (or the newest one in a folder) as a plain state dict, on CPU."""
    path = Path(path)
    if path.is_dir():
        path = checkpoint_in_dir(path)
    name = printable(path)
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and obj.get("format") == localizer.FORMAT:
        raise CheckpointError(f"{name}: this is a localizer checkpoint ({obj.get('arch')}), not the recognizer; pass it as --localizer")
    if isinstance(obj, dict):
        inner = next((obj[w] for w in _WRAPPERS if isinstance(obj.get(w), dict)), None)
        obj = obj if inner is None else inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{name}: holds a {type(obj).__name__}, not a state dict of tensors")
    return normalise_keys(obj)


def _refusal(path: Path) -> str:
    """Why weights_only=True refused a file: the pickled globals it names, when it can say."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: it cannot be inspected, and is not one of ours
        names = []
    if names:
        return (
            f"{printable(path)}: refused, it holds pickled Python code or objects ({', '.join(names[:3])}), not only tensors; "
            "only plain state dicts are loaded (weights_only=True). Re-save it with torch.save(model.state_dict())"
        )
    return f"{printable(path)}: not a PyTorch checkpoint (its pickle cannot be read)"


def load_model(path: str | os.PathLike) -> SVHNModel:
    """The network with the checkpoint's weights, in eval mode, on CPU, in fp32; CheckpointError
    for a file whatever is wrong with it, its weights included."""
    state_dict = load_state_dict(path)
    try:
        return model_from_state_dict(state_dict, printable(path))
    except WeightsError as e:
        raise CheckpointError(str(e)) from None


def load_localizer(path: str | os.PathLike) -> Localizer:
    """The localizer a file (or the newest localizer-<step>.pth in a folder) holds, checked, in
    eval mode on the CPU in fp32; CheckpointError naming the file and what it is otherwise (the
    recognizer's file given here included)."""
    path = localizer_file(Path(path))
    try:
        return localizer.from_checkpoint(read_checkpoint(path), printable(path))
    except LocalizerWeightsError as e:
        raise CheckpointError(str(e)) from None


def localizer_file(path: Path) -> Path:
    """The file itself, or the newest localizer-<step>.pth in a folder (a folder of the
    recognizer's checkpoints is named as such)."""
    if not path.is_dir():
        return path
    try:
        return checkpoint_in_dir(path, _LOCALIZER_NAME)
    except CheckpointError as e:
        if any(path.glob("model-*.pth")):
            raise CheckpointError(f"{e}; it holds the recognizer's model-<step>.pth: pass that as --checkpoint") from None
        raise


def find_localizer(explicit: str | os.PathLike | None = None) -> Path:
    """--localizer, else $SVHN_LOCALIZER, else the localizer shipped in weights/ (a folder: its
    newest localizer-<step>.pth)."""
    for given, what in ((explicit, "--localizer"), (os.environ.get("SVHN_LOCALIZER"), "SVHN_LOCALIZER")):
        if given:
            path = Path(given).expanduser()
            if not path.exists():
                raise CheckpointError(f"{printable(path)}: no such file or folder (given by {what})")
            try:
                return localizer_file(path)
            except CheckpointError as e:
                raise CheckpointError(f"{e} (given by {what})") from None
    if not SHIPPED_LOCALIZER.is_file():
        raise CheckpointError(f"{printable(SHIPPED_LOCALIZER)}: the shipped localizer is missing; pass --localizer PATH "
                              "(train one: python train.py --task localizer ...)")
    return SHIPPED_LOCALIZER


# --------------------------------------------------------------------------------------------
# Finding
# --------------------------------------------------------------------------------------------


def modelscope_cache_dirs() -> list[Path]:
    """Where the ModelScope SDK has kept this model over its versions."""
    root = Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope")).expanduser()
    owner, name = MODEL_ID.split("/")
    dirs = []
    for base in (root, root / "hub"):
        dirs += [base / owner / name, base / "models" / owner / name]
        dirs += sorted((base / "models" / f"{owner}--{name}" / "snapshots").glob("*"))
    return dirs


def find_checkpoint(explicit: str | os.PathLike | None = None, download: bool = True) -> Path:
    """--checkpoint, else $SVHN_CHECKPOINT, else ./checkpoints, else the ModelScope cache, else a
    download with modelscope (not when SVHN_OFFLINE=1). Raises CheckpointError with the exact
    command to run when there is none."""
    for given, what in ((explicit, "--checkpoint"), (os.environ.get("SVHN_CHECKPOINT"), "SVHN_CHECKPOINT")):
        if given:
            path = Path(given).expanduser()
            if not path.exists():
                raise CheckpointError(f"{printable(path)}: no such file or folder (given by {what})")
            if not path.is_dir():
                return path
            try:
                return checkpoint_in_dir(path)
            except CheckpointError as e:
                raise CheckpointError(f"{e} (given by {what})") from None
    here = Path(__file__).resolve().parents[1]
    for folder in [Path.cwd() / "checkpoints", here / "checkpoints", *modelscope_cache_dirs()]:
        if folder.is_dir():
            try:
                return checkpoint_in_dir(folder)
            except CheckpointError:
                continue
    if download and os.environ.get("SVHN_OFFLINE", "") in ("", "0"):
        return _download()
    raise CheckpointError(f"no checkpoint found; download the published weights: {DOWNLOAD_HINT}")


def _download() -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise CheckpointError(f"no checkpoint found and modelscope is not installed; {DOWNLOAD_HINT}") from None
    try:  # fail at once offline instead of waiting through the SDK's retries
        socket.getaddrinfo("modelscope.cn", 443)
    except OSError:
        raise CheckpointError(f"no checkpoint found and modelscope.cn cannot be reached; on a machine with a network: {DOWNLOAD_HINT}") from None
    try:
        folder = snapshot_download(MODEL_ID, allow_patterns=["model-*.pth"])
    except Exception as e:  # the SDK raises many kinds; all mean "no weights"
        raise CheckpointError(f"downloading {MODEL_ID} failed ({one_line(e)}); {DOWNLOAD_HINT}") from None
    return checkpoint_in_dir(Path(folder))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def save_atomic(obj: object, path: str | os.PathLike) -> Path:
    """torch.save through svhn.files.write_atomic: a kill or a full disk mid-save never leaves a
    broken file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda f: torch.save(obj, f))
