"""The bridge to an offline model (.om) run by ais_bench on Ascend: a network's inputs written as
ais_bench inputs, and ais_bench's outputs read back as the network's outputs.

ais_bench takes a folder of raw `.bin` inputs and writes, per input, one file per output named
`<input name>_<output index>.<outfmt>` (ait benchmark's documentation), in the model's output
order (the NetworkSpec's: for the recognizer `_0` length, `_1` .. `_5` digit1 .. digit5). Each
`.bin` here holds one batch of the .om's fixed batch size (the last one padded with zeros);
`index.json` says which labelled images each holds, so the outputs can be scored without the
images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from svhn.exits import EXIT_FAILED, UserError
from svhn.network import NetworkSpec
from svhn.text import printable

INDEX = "index.json"


class OmError(UserError):
    """Inputs or outputs that do not fit; the message names the file."""

    status = EXIT_FAILED


def bin_name(k: int) -> str:
    return f"batch-{k:06d}"


def write_batch(folder: Path, k: int, batch: torch.Tensor, size: int) -> None:
    """One .bin: `size` inputs, float32 N x 3 x H x W, zeros after the real ones."""
    x = np.zeros((size, *batch.shape[1:]), dtype=np.float32)
    x[: len(batch)] = batch.numpy()
    x.tofile(folder / f"{bin_name(k)}.bin")


def write_index(folder: Path, batch_size: int, files: list[list[str]], source: dict) -> None:
    (folder / INDEX).write_text(json.dumps({"batch_size": batch_size, "batches": files, **source}, indent=1))


def read_index(folder: Path) -> dict:
    try:
        return json.loads((folder / INDEX).read_text())
    except (OSError, ValueError) as e:
        raise OmError(f"{printable(folder / INDEX)}: cannot be read ({e}); write the inputs with --write-bins first") from None


def read_outputs(folder: Path, k: int, batch_size: int, n: int, spec: NetworkSpec) -> tuple[torch.Tensor, ...]:
    """The network's outputs for bin k's first n inputs, from ais_bench's .txt, .npy or .bin files
    (each output read as N x its size, as the spec gives them)."""
    heads = []
    for h, (name, shape) in enumerate(spec.outputs):
        size = int(np.prod(shape))
        stem = f"{bin_name(k)}_{h}"
        found = [p for p in (folder / f"{stem}.txt", folder / f"{stem}.npy", folder / f"{stem}.bin") if p.is_file()]
        if not found:
            raise OmError(f"{printable(folder / stem)}.txt: no such ais_bench output ({name} of {bin_name(k)}.bin)")
        path = found[0]
        try:
            if path.suffix == ".txt":
                values = np.array(path.read_text().split(), dtype=np.float32)
            elif path.suffix == ".npy":
                values = np.load(path, allow_pickle=False).astype(np.float32).ravel()
            else:
                values = np.fromfile(path, dtype=np.float32)
        except (OSError, ValueError) as e:
            raise OmError(f"{printable(path)}: not an ais_bench output of numbers ({e})") from None
        if values.size != batch_size * size:
            raise OmError(f"{printable(path)}: {values.size} values, expected {batch_size} x {size} ({name})")
        heads.append(torch.from_numpy(values.reshape(batch_size, *shape)[:n].copy()))
    return tuple(heads)
