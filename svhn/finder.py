"""Find, then read: the localizer finds the numbers in a whole photo, each found box is cropped by
the published protocol (svhn.images.digit_crop: square, grown 30 %, bicubic 64x64, centre 54x54)
and the recognizer reads the crop. One implementation for inference.py, eval_accuracy.py,
eval_performance.py and the comparisons; each network is any svhn.network.Runnable (PyTorch on a
device, or ONNX Runtime)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

import localizer as L
from model import Reading, decode
from svhn.boxes import Letterbox, letterbox
from svhn.images import digit_crop, open_image, size_note, to_tensor


@dataclass
class Photo:
    """A whole photo made ready for finding: the image, its letterboxed localizer input (uint8
    160 x 160 x 3), the letterbox geometry, and size_note's word on it."""

    image: Image.Image
    input: np.ndarray
    geometry: Letterbox
    note: str | None = None


def photo_for_finding(source: str | os.PathLike | bytes | Image.Image) -> Photo:
    img = open_image(source)
    array, geometry = letterbox(img, L.INPUT_SIZE)
    return Photo(img, array, geometry, size_note(*img.size))


@dataclass
class FoundNumber:
    """One number found and read: its box in the photo's pixels [left, top, width, height] (before
    the crop's 30 % growth), the localizer's score, the crop and the recognizer's reading."""

    box: list[float]
    score: float
    crop: np.ndarray
    reading: Reading


@dataclass
class PhotoResult:
    """What a photo reads as: the numbers found, best first (empty: nothing found)."""

    found: list[FoundNumber] = field(default_factory=list)

    @property
    def best(self) -> FoundNumber | None:
        return self.found[0] if self.found else None


Run = Callable[[torch.Tensor, Sequence[str]], Sequence[torch.Tensor]]  # (batch, image names) -> outputs


def crop_found(photo: Photo, box: Sequence[float]) -> np.ndarray:
    """The recognizer's 54 x 54 input for a found box, as the published evaluation crops a true one."""
    return digit_crop(photo.image, [box])


def find_and_read(photos: Sequence[Photo], names: Sequence[str], localize: Run, recognize: Run,
                  threshold: float = L.SCORE_THRESHOLD, every: bool = True) -> list[PhotoResult]:
    """Every photo's numbers: one localizer batch, then one recognizer batch of every found crop
    (the best of each photo only, unless `every`). `localize` and `recognize` run a CPU batch
    (a Runnable's outputs, or a Comparison's add)."""
    if not photos:
        return []
    found = L.decode(localize(to_tensor([p.input for p in photos]), names), threshold)
    jobs = []  # (photo index, box in the photo, score, crop, name)
    for i, (photo, numbers) in enumerate(zip(photos, found)):
        for f in numbers if every else numbers[:1]:
            box = photo.geometry.to_photo(f.box)
            if box[2] < 1 or box[3] < 1:
                continue  # a box that lies in the letterbox's grey, outside the photo
            jobs.append((i, box, f.score, crop_found(photo, box), f"{names[i]}#box{sum(j[0] == i for j in jobs)}"))
    results = [PhotoResult() for _ in photos]
    if jobs:
        readings = decode(recognize(to_tensor([j[3] for j in jobs]), [j[4] for j in jobs]))
        for (i, box, score, crop, _), reading in zip(jobs, readings):
            results[i].found.append(FoundNumber([round(v, 1) for v in box], score, crop, reading))
    return results


# --------------------------------------------------------------------------------------------
# A picture for people
# --------------------------------------------------------------------------------------------


def drawn(photo: Photo, result: PhotoResult) -> bytes:
    """The photo as PNG with each found box (the best in red, others in orange) and its reading
    and score written above it; "nothing found" in the corner when there is none."""
    from PIL import ImageDraw, ImageFont

    img = photo.image.copy()
    if max(img.size) < 320:  # small photos (SVHN's are 40 to 800 pixels) scaled up so the text can be read
        k = 320 / max(img.size)
        img = img.resize((round(img.width * k), round(img.height * k)), Image.BICUBIC)
    k = img.width / photo.image.width
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(12, img.height // 20))
    width = max(2, img.height // 150)
    for n, f in reversed(list(enumerate(result.found))):
        x, y, w, h = (v * k for v in f.box)
        colour = (230, 30, 30) if n == 0 else (255, 150, 0)
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=width)
        draw.text((x, max(0, y - font.size - 4)), f"{f.reading.number or '-'}  {f.reading.confidence:.2f} | find {f.score:.2f}", fill=colour, font=font,
                  stroke_width=2, stroke_fill=(255, 255, 255))
    if not result.found:
        draw.text((4, 4), "nothing found", fill=(230, 30, 30), font=font, stroke_width=2, stroke_fill=(255, 255, 255))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()
