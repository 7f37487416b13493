"""Training data: labelled folders turned once into an on-disk cache of 64x64 crops.

Each record is cropped by the published protocol (svhn.images.labelled_crop, the code
eval_accuracy.py uses) but kept at 64x64, inside which training takes a random 54x54 crop and
validation the centre one. The crops of a folder are stored as one memory-mapped uint8 array, so
235,000 SVHN images train without decoding a PNG again. The cache is keyed by the labels file
and by the name, size and modification time of every file in the folder: change any and it is
rebuilt; otherwise it is reused as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from svhn.images import CROP, CROP_OFFSET, RESIZE, labelled_crop, load_ahead, to_tensor
from svhn.labels import MAX_DIGITS, find_labels, head_targets, labelled_set
from svhn.text import printable

CACHE_VERSION = 2  # 2: entries naming files outside their folder are left out


@dataclass
class CropSet:
    """crops: N x 64 x 64 x 3 uint8 (memory-mapped); targets: N x 6 int64, the length then the
    five digits (10 past the end); files: the image of each row."""

    crops: np.ndarray
    targets: np.ndarray
    files: list[str]

    def __len__(self) -> int:
        return len(self.files)


def fingerprint(folder: Path, labels: Path) -> str:
    """Changes when the labels file or any file in the folder is added, removed or rewritten."""
    h = hashlib.sha256(f"v{CACHE_VERSION} {labels.resolve()}".encode())
    for path in sorted([labels, *(p for p in folder.iterdir() if p.is_file())], key=lambda p: p.name):
        info = path.stat()
        h.update(f"{path.name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def load_folder(folder: Path, cache_root: Path, workers: int = 2, report=print, warn=lambda line: None) -> CropSet:
    """The crops of one labelled folder, from the cache or built into it (with a progress bar).
    Records that cannot be used are reported (one line each, through `report`) and left out;
    the labels' warnings go to `warn`, from the cache too."""
    labels = find_labels(folder, None)
    cache = cache_root / fingerprint(folder, labels)
    meta_path = cache / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        for line in meta["left_out"]:
            report(line)
        for line in meta["warnings"]:
            warn(line)
        n = len(meta["files"])
        crops = np.memmap(cache / "crops.u8", dtype=np.uint8, mode="r", shape=(n, RESIZE, RESIZE, 3)) if n else np.zeros((0, RESIZE, RESIZE, 3), np.uint8)
        return CropSet(crops, np.load(cache / "targets.npy"), meta["files"])
    found = labelled_set(folder)
    left_out, records, warnings = found.errors + found.too_long, found.records, found.warnings
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # rows are written in order; rows left over by failed images stay unused at the file's end
    crops = np.memmap(tmp / "crops.u8", mode="w+", dtype=np.uint8, shape=(max(len(records), 1), RESIZE, RESIZE, 3))
    kept, targets = [], []
    with tqdm(total=len(records), desc=f"caching {printable(folder)}", unit="img", file=sys.stderr, disable=None) as bar:
        for done, batch, failed in load_ahead(records, lambda r: labelled_crop(folder / r.file, r.boxes, size=RESIZE), 256, workers, to_batch=False):
            left_out += [message for _, message in failed]
            for r, array in zip(done, batch):
                crops[len(kept)] = array
                kept.append(r.file)
                targets.append(head_targets(r.digits))
            bar.update(len(done) + len(failed))
    crops.flush()
    del crops
    np.save(tmp / "targets.npy", np.array(targets, dtype=np.int64).reshape(-1, 1 + MAX_DIGITS))
    (tmp / "meta.json").write_text(json.dumps({"labels": str(labels), "files": kept, "left_out": left_out, "warnings": warnings}))
    if cache.exists():  # another process built the same cache meanwhile; theirs is as good
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, cache)
    for line in left_out:
        report(line)
    for line in warnings:
        warn(line)
    return load_folder(folder, cache_root, workers, report=lambda line: None)


def concat(sets: list[CropSet]) -> CropSet:
    if len(sets) == 1:
        return sets[0]
    return CropSet(np.concatenate([s.crops for s in sets]), np.concatenate([s.targets for s in sets]), [f for s in sets for f in s.files])


def batch_tensor(crops: np.ndarray, offsets: np.ndarray | None = None) -> torch.Tensor:
    """N x 64 x 64 x 3 uint8 crops to the network's N x 3 x 54 x 54 input: at the given (N x 2)
    offsets (random crops for training), or the centre (validation, as evaluation crops)."""
    n = len(crops)
    if offsets is None:
        out = crops[:, CROP_OFFSET : CROP_OFFSET + CROP, CROP_OFFSET : CROP_OFFSET + CROP]
    else:
        out = np.stack([crops[i, y : y + CROP, x : x + CROP] for i, (y, x) in enumerate(offsets)]) if n else np.zeros((0, CROP, CROP, 3), np.uint8)
    return to_tensor(out)
