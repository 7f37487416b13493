"""A seeded, time-bounded fuzz suite over the three readers of untrusted files: images,
checkpoints and labels. The property: nothing escapes but the project's own one-line errors
(ImageError, CheckpointError, LabelError), and the good inputs beside a bad one are still read.

SVHN_FUZZ_SECONDS sets the time per reader (default 6, for CI); SVHN_FUZZ_SEED the seed.
A longer manual run: SVHN_FUZZ_SECONDS=300 python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import time

import numpy as np
import torch
from PIL import Image

from conftest import ROOT
from digitstruct import write_digit_struct
from svhn.checkpoints import CheckpointError, load_model
from svhn.images import ImageError, load_ahead, photo_input
from svhn.labels import LabelError, read_labels

SECONDS = float(os.environ.get("SVHN_FUZZ_SECONDS", "6"))
SEED = int(os.environ.get("SVHN_FUZZ_SEED", "20261130"))


def budget():
    """Yields iteration numbers until the time is up (at least 20 iterations)."""
    end, i = time.monotonic() + SECONDS, 0
    while i < 20 or time.monotonic() < end:
        yield i
        i += 1


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One of: flip bytes, truncate, insert junk, duplicate a slice, zero a run."""
    data = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:
        data = data[: rng.randrange(len(data))]
    elif kind == 2:
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == 3:
        a = rng.randrange(len(data))
        data[a:a] = data[a : a + rng.randint(1, 256)]
    else:
        a = rng.randrange(len(data))
        data[a : a + rng.randint(1, 512)] = bytes(min(512, len(data) - a))
    return bytes(data)


def seeds() -> list[bytes]:
    """Real encodings to mutate: the bundled photos, and small images in each format read."""
    out = [p.read_bytes() for p in sorted((ROOT / "examples").glob("*.png"))[:3]]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    for fmt, kwargs in (("JPEG", {"quality": 80}), ("GIF", {}), ("BMP", {}), ("WEBP", {}), ("TIFF", {}), ("PNG", {})):
        buf = io.BytesIO()
        img.save(buf, fmt, **kwargs)
        out.append(buf.getvalue())
    return out


def test_fuzz_images(tmp_path):
    rng = random.Random(SEED)
    originals = seeds()
    good = tmp_path / "good.png"
    good.write_bytes(originals[0])
    for i in budget():
        data = mutate(rng.choice(originals), rng) if rng.random() < 0.9 else bytes(rng.randrange(256) for _ in range(rng.randint(0, 400)))
        path = tmp_path / f"f{i % 8}.img"
        path.write_bytes(data)
        try:
            arr = photo_input(path)
            assert arr.shape == (54, 54, 3) and arr.dtype == np.uint8
        except ImageError as e:
            assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
        # in a batch beside a good image, the good one is still read
        if i % 10 == 0:
            results = list(load_ahead([good, path, good], photo_input, batch_size=3, workers=2))
            done = [item for batch in results for item in batch[0]]
            assert done.count(good) == 2


def test_fuzz_checkpoints(tmp_path, random_checkpoint):
    rng = random.Random(SEED + 1)
    real = (random_checkpoint / "model-7.pth").read_bytes()
    small = io.BytesIO()
    torch.save({"_hidden1.0.weight": torch.zeros(2, 2), "n": torch.tensor(3)}, small)
    for i in budget():
        path = tmp_path / f"model-{i % 4}.pth"
        roll = rng.random()
        if roll < 0.4:  # the real file's zip headers and pickle, or its central directory, damaged
            head, tail = real[:65536], real[-4096:]
            data = mutate(head, rng) + real[65536:-4096] + tail if rng.random() < 0.6 else real[:-4096] + mutate(tail, rng)
        elif roll < 0.8:
            data = mutate(small.getvalue(), rng)
        else:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 2000)))
        path.write_bytes(data)
        try:
            load_model(path)
        except CheckpointError as e:
            assert "\n" not in str(e) and str(path) in str(e), str(e)


def random_value(rng: random.Random, depth: int = 0):
    choices = [
        lambda: rng.choice([None, True, False, 0, -1, 3, 10**30, float("nan"), float("inf"), -0.0, 1e-300]),
        lambda: rng.choice(["", "0", "03", "12345", "123456", "x1", "½", "٣", " 7 ", "1e3", "-4"]),
        lambda: [random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))] if depth < 3 else [],
        lambda: {rng.choice(["file", "label", "number", "boxes", "x"]): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
        if depth < 3 else {},
        lambda: [[rng.uniform(-1e5, 1e5) for _ in range(rng.choice([3, 4, 4, 4, 5]))] for _ in range(rng.randint(0, 6))],
    ]
    return rng.choice(choices)()


def random_entry(rng: random.Random):
    if rng.random() < 0.15:
        return random_value(rng)
    entry = {"file": rng.choice([f"{rng.randrange(5)}.png", 123, None, "", "a/../b.png"]), "label": random_value(rng)}
    if rng.random() < 0.5:
        entry["label"] = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 7)))
    if rng.random() < 0.7:
        entry["boxes"] = random_value(rng) if rng.random() < 0.4 else [
            [rng.choice([rng.uniform(-50, 500), float("nan"), float("inf"), 1e12]) for _ in range(4)] for _ in range(len(str(entry["label"])))
        ]
    return entry


def check_records(records) -> None:
    for r in records:
        assert isinstance(r.file, str) and r.file and all(0 <= d <= 9 for d in r.digits) and r.digits
        if r.boxes is not None:
            assert len(r.boxes) == len(r.digits) and all(len(b) == 4 and all(math.isfinite(v) for v in b) for b in r.boxes)


def test_fuzz_labels(tmp_path):
    rng = random.Random(SEED + 2)
    for i in budget():
        entries = [random_entry(rng) for _ in range(rng.randint(0, 12))]
        kind = i % 4
        if kind == 0:
            path = tmp_path / "labels.json"
            path.write_text(json.dumps(entries if rng.random() < 0.9 else random_value(rng)))
        elif kind == 1:
            path = tmp_path / "labels.csv"
            rows = ["file,number,boxes"] + [
                f"{e.get('file') if isinstance(e, dict) else e},{e.get('label') if isinstance(e, dict) else ''},\"{json.dumps(e.get('boxes') if isinstance(e, dict) else None).replace(chr(34), chr(34) * 2)}\""
                for e in entries
            ]
            path.write_bytes(("\n".join(rows)).encode("utf-8-sig" if rng.random() < 0.3 else "utf-8"))
        elif kind == 2:
            path = tmp_path / "labels.json"
            path.write_bytes(mutate(json.dumps(entries).encode() or b"[]", rng))
        else:
            path = tmp_path / "digitStruct.mat"
            records = []
            for _ in range(rng.randint(1, 4)):
                n = rng.randint(1, 3)
                labels = [rng.choice([1, 5, 10, 0, 11, -3, 2.5, float("nan")]) for _ in range(n)]
                boxes = [[rng.choice([3.0, 50.0, float("nan"), float("inf"), -1e9]) for _ in range(4)] for _ in range(n)]
                records.append((f"{rng.randrange(5)}.png", labels, boxes))
            write_digit_struct(path, records)
        try:
            records, errors, warnings = read_labels(path)
        except LabelError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            continue
        check_records(records)
        assert all("\n" not in line for line in errors + warnings)
