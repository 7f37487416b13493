"""Images in, network input out.

Opening whatever image a user has (any mode, EXIF orientation, bad files reported in one line),
the published preprocessing (bilinear resize to 64x64, centre crop 54x54, [-1, 1]), the SVHN
evaluation crop around the digit boxes, and a loader that decodes ahead on background threads.
"""

from __future__ import annotations

import glob
import io
import os
import stat
import sys
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from svhn.exits import UserError

from svhn.text import one_line, printable

RESIZE = 64
CROP = 54
CROP_OFFSET = int(round((RESIZE - CROP) / 2.0))  # 5, as torchvision's CenterCrop computes it
MEAN = STD = 0.5
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own bomb limit (about 89 megapixels)


STDIN = "-"  # an input spec that means: one image from standard input

# Pillow warns (instead of refusing) between MAX_IMAGE_PIXELS and twice that, from inside
# Image.open. open_image refuses those images itself from the header's size, before decoding, so
# Pillow's warning says nothing new. The filter is installed once, here: toggling it per image
# with warnings.catch_warnings() is not thread-safe, and the loader decodes on several threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Pillow's plug-ins also warn about damaged metadata (TIFF tags, EXIF) as two raw lines each; the
# image is then read or refused all the same, and a refusal is reported in one line.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


class ImageError(UserError):
    """An input that cannot be read; str() is one line that names the file. `spec` is the input
    as the user gave it, where that is not a file (a glob, a folder)."""

    def __init__(self, message: str, spec: str | None = None) -> None:
        super().__init__(message)
        self.spec = spec


# --------------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------------


def _stream(source: str | os.PathLike | bytes, name: str):
    """What Image.open reads: the bytes, or a path checked with stat() first (a FIFO or device
    would block or never end, a folder is no image)."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError(f"{name}: empty file")
        return io.BytesIO(source)
    if os.fspath(source) == STDIN:
        data = sys.stdin.buffer.read()
        if not data:
            raise ImageError(f"{name}: empty input on standard input")
        return io.BytesIO(data)
    try:
        info = os.stat(source)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except OSError as e:  # permission denied on a folder on the way, a symbolic link loop, ...
        raise ImageError(f"{name}: {(e.strerror or one_line(e)).lower()}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{name}: is a folder, not an image")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{name}: not a regular file (a FIFO, socket or device), not read")
    if info.st_size == 0:
        raise ImageError(f"{name}: empty file")
    return source


def open_image(source: str | os.PathLike | bytes | Image.Image, name: str | None = None) -> Image.Image:
    """An RGB PIL image from a path ('-': standard input), raw bytes or a PIL image, upright per
    its EXIF orientation. Images over MAX_PIXELS are refused from their header, before decoding."""
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source))
    name = name or ("<bytes>" if isinstance(source, (bytes, bytearray)) else printable(source))
    try:
        with Image.open(_stream(source, name)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{name}: refused, {img.width}x{img.height} is more than {MAX_PIXELS:,} pixels (a possible decompression bomb)")
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: refused, more than {2 * MAX_PIXELS:,} pixels (a possible decompression bomb)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image, or a format Pillow cannot read") from None
    except MemoryError:
        raise ImageError(f"{name}: does not fit in memory") from None
    except Exception as e:  # a corrupt file makes Pillow's decoders raise many kinds
        raise ImageError(f"{name}: truncated or corrupt image ({type(e).__name__}: {one_line(e, 160)})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB the way the published demo's convert('RGB') does, except that 16-bit and float
    grey images are scaled to 8 bits first (Pillow would clip them to white)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.float64)
        if a.size and a.max() > 255:
            a = a * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


# --------------------------------------------------------------------------------------------
# The published preprocessing
# --------------------------------------------------------------------------------------------


def resize_and_crop(img: Image.Image, resample: int = Image.BILINEAR, size: int = CROP) -> np.ndarray:
    """64x64 resize then the central 54x54, as uint8 H x W x 3 (torchvision's Resize([64, 64])
    and CenterCrop([54, 54]) on a PIL image do exactly these two calls); size=RESIZE stops
    before the crop."""
    small = img.resize((RESIZE, RESIZE), resample)
    if size == RESIZE:
        return np.array(small, dtype=np.uint8)
    box = (CROP_OFFSET, CROP_OFFSET, CROP_OFFSET + CROP, CROP_OFFSET + CROP)
    return np.array(small.crop(box), dtype=np.uint8)  # a writable copy, for torch.from_numpy


def to_tensor(arrays: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (N x) 54 x 54 x 3 to float32 (N x) 3 x 54 x 54 in [-1, 1].

    The operations and their order are ToTensor's (to float, divide by 255) then Normalize's
    (subtract the mean tensor, divide by the std tensor), so the result is the same to the bit.
    """
    a = np.ascontiguousarray(np.stack(arrays) if isinstance(arrays, (list, tuple)) else arrays)
    t = torch.from_numpy(a)
    t = t.permute(2, 0, 1) if t.dim() == 3 else t.permute(0, 3, 1, 2)
    t = t.contiguous().to(torch.float32).div(255)
    shape = (3, 1, 1) if t.dim() == 3 else (1, 3, 1, 1)
    mean = torch.full(shape, MEAN, dtype=torch.float32)
    std = torch.full(shape, STD, dtype=torch.float32)
    return t.sub(mean).div(std)


def photo_input(source: str | os.PathLike | bytes | Image.Image) -> np.ndarray:
    """The 54x54x3 uint8 crop of a whole photo, as the published demo prepares it."""
    return resize_and_crop(open_image(source))


# A digit needs some 8 pixels of height to be told from another (SVHN's smallest digit boxes are
# about that tall), and a photo stretched past 10:1 to the network's square input squashes any
# number it holds into strokes.
MIN_SIDE = 8
MAX_ASPECT = 10


def size_note(width: int, height: int) -> str | None:
    """Why an image of this size cannot hold a readable number (None when it can)."""
    if min(width, height) < MIN_SIDE:
        return f"{width}x{height} pixels, too small to hold a readable number (under {MIN_SIDE} pixels on a side); read anyway"
    if max(width, height) > MAX_ASPECT * min(width, height):
        return f"{width}x{height} pixels, too thin to hold a readable number (more than {MAX_ASPECT}:1, squashed to a square); read anyway"
    return None


def photo_input_noted(source: str | os.PathLike | bytes) -> tuple[np.ndarray, str | None]:
    """photo_input, and size_note's word on the photo."""
    img = open_image(source)
    return resize_and_crop(img), size_note(*img.size)


def random_input(n: int, seed: int = 0, size: tuple[int, int] = (CROP, CROP)) -> torch.Tensor:
    """n RGB images of uniform uint8 noise (height x width `size`), reproducible from the seed,
    as network input: what every self-check, timing and random comparison feeds a network."""
    g = torch.Generator().manual_seed(seed)
    return to_tensor(torch.randint(0, 256, (n, *size, 3), generator=g, dtype=torch.uint8).numpy())


def preprocess(source: str | os.PathLike | bytes | Image.Image) -> torch.Tensor:
    """The network's input (3 x 54 x 54, float32) for one image, as the published demo makes it."""
    return to_tensor(photo_input(source))


# --------------------------------------------------------------------------------------------
# The SVHN evaluation crop (the published format-1 conversion)
# --------------------------------------------------------------------------------------------


def digit_crop_box(boxes: Iterable[Sequence[float]]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the crop around the digit boxes [left, top, width, height].

    Each box truncated to integers; their union; a square of side max(width, height) around
    the union's centre; grown by 30 % (left = round(left - 0.15 side), side = round(1.3 side)).
    Python's round() halves to even, as the published conversion script did.
    """
    boxes = [[int(v) for v in box] for box in boxes]
    if not boxes:
        raise ValueError("no digit boxes")
    left = min(b[0] for b in boxes)
    top = min(b[1] for b in boxes)
    right = max(b[0] + b[2] for b in boxes)
    bottom = max(b[1] + b[3] for b in boxes)
    side = max(right - left, bottom - top)
    square_left = (left + right) / 2.0 - side / 2.0
    square_top = (top + bottom) / 2.0 - side / 2.0
    crop_left = int(round(square_left - 0.15 * side))
    crop_top = int(round(square_top - 0.15 * side))
    crop_size = int(round(side * 1.3))
    return crop_left, crop_top, crop_left + crop_size, crop_top + crop_size


def digit_crop(img: Image.Image, boxes: Iterable[Sequence[float]], size: int = CROP) -> np.ndarray:
    """The network's 54x54 uint8 input for an image with digit boxes: crop (Pillow pads outside
    the image with black), bicubic resize to 64x64 (Image.resize's default), centre crop."""
    return resize_and_crop(img.crop(digit_crop_box(boxes)), Image.BICUBIC, size)


def labelled_crop(path: str | os.PathLike, boxes: Sequence[Sequence[float]] | None, size: int = CROP) -> np.ndarray:
    """The uint8 size x size x 3 input for a labelled photo: the published box crop when it has
    digit boxes, else the whole image as inference.py reads it (size=RESIZE keeps the whole 64x64,
    inside which training crops at random). Boxes with no area, outside the image, or so large
    that the crop would dwarf the image are refused with ImageError."""
    name = printable(path)
    img = open_image(path, name=name)
    if not boxes:
        return resize_and_crop(img, size=size)
    w, h = img.size
    for left, top, bw, bh in boxes:
        if bw <= 0 or bh <= 0:
            raise ImageError(f"{name}: a digit box has no area ({left}, {top}, {bw}, {bh})")
        if left >= w or top >= h or left + bw <= 0 or top + bh <= 0:
            raise ImageError(f"{name}: a digit box lies outside the {w}x{h} image ({left}, {top}, {bw}, {bh})")
    left, _, right, _ = digit_crop_box(boxes)
    if right - left > 4 * max(w, h):  # Pillow would allocate a huge black canvas around the photo
        raise ImageError(f"{name}: the digit boxes give a {right - left}-pixel crop for a {w}x{h} image; boxes far larger than the image")
    return digit_crop(img, boxes, size)


# --------------------------------------------------------------------------------------------
# Finding inputs and loading them ahead
# --------------------------------------------------------------------------------------------


def expand_inputs(specs: Iterable[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their images, sorted, not recursive, hidden files skipped), globs and '-'
    (standard input) to a list of image paths, plus one error line for each spec that gives
    nothing. A file named explicitly is always tried, whatever its suffix."""
    paths: list[Path] = []
    errors: list[str] = []
    for spec in specs:
        if spec == STDIN:
            paths.append(Path(STDIN))
        elif any(ch in spec for ch in "*?[") and not os.path.exists(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                errors.append(_no_match(spec))
            for m in matches:
                if os.path.isdir(m):
                    found, errs = _images_in(Path(m))
                    paths += found
                    errors += errs
                else:
                    paths.append(Path(m))
        elif os.path.isdir(spec):
            found, errs = _images_in(Path(spec))
            paths += found
            errors += errs
        else:
            paths.append(Path(spec))  # missing files are reported when they are opened
    return paths, errors


def _no_match(pattern: str) -> str:
    """Why a glob matched nothing: glob() is silent about a folder it may not read."""
    folder = Path(pattern)
    while folder != folder.parent and (any(ch in str(folder) for ch in "*?[") or not folder.exists()):
        folder = folder.parent
    if folder.is_dir() and not os.access(folder, os.R_OK | os.X_OK):
        return f"{printable(folder)}: folder cannot be read (permission denied), so {printable(pattern)} matches nothing"
    return f"{printable(pattern)}: no file matches this pattern"


def _images_in(folder: Path) -> tuple[list[Path], list[str]]:
    try:
        entries = sorted(folder.iterdir())
    except PermissionError:
        return [], [f"{printable(folder)}: folder cannot be read (permission denied)"]
    except OSError as e:
        return [], [f"{printable(folder)}: folder cannot be read ({one_line(e)})"]
    # hidden files (macOS's ._* resource forks, .DS_Store) are no photos
    found = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and not p.is_dir()]
    if not found:
        return [], [f"{printable(folder)}: no images in this folder"]
    return found, []


def load_ahead(
    items: Sequence, load: Callable[[object], np.ndarray], batch_size: int, workers: int = 2, to_batch: bool = True
) -> Iterator[tuple[list, torch.Tensor | list | None, list[tuple[object, str]]]]:
    """Yield (items loaded, their input tensor or None, [(item, error line)]) per batch
    (to_batch=False: the loaded arrays as they are, a list).

    load(item) returns a 54x54x3 uint8 array or raises ImageError. Decoding runs on `workers`
    threads (Pillow releases the GIL; 0: in the caller's thread) up to two batches ahead, so the
    device is not kept waiting. Not torch's DataLoader: an item that fails is reported by name
    and the batch goes on without it, in input order, with no worker processes to start.
    """
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
    pending: deque = deque()
    it = iter(items)
    window = 2 * batch_size + workers if workers > 0 else 1

    def fill() -> None:
        while len(pending) < window:
            try:
                item = next(it)
            except StopIteration:
                return
            pending.append((item, pool.submit(_try_load, load, item) if pool else _Done(_try_load(load, item))))

    try:
        fill()
        while pending:
            done, arrays, failed = [], [], []
            while pending and len(done) + len(failed) < batch_size:
                item, future = pending.popleft()
                array, error = future.result()
                if error is None:
                    done.append(item)
                    arrays.append(array)
                else:
                    failed.append((item, error))
                fill()
            yield done, ((to_tensor(arrays) if arrays else None) if to_batch else arrays), failed
    finally:  # Ctrl-C or a closed pipe: drop what is queued instead of decoding it first
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)


class Failures:
    """Counts inputs that could not be read; each is reported (default: on stderr) as it happens."""

    def __init__(self, lines: Iterable[str] = (), report: Callable[[str], None] | None = None) -> None:
        self.count = 0
        self._report = report or (lambda line: print(f"error: {line}", file=sys.stderr, flush=True))
        self.add(lines)

    def add(self, lines: Iterable[str]) -> None:
        for line in lines:
            self._report(line)
            self.count += 1


def readable_batches(items: Sequence, load: Callable, batch_size: int, workers: int, failures: Failures) -> Iterator[tuple[list, torch.Tensor]]:
    """(items, input batch) for every batch with at least one readable item (load_ahead); the
    others are reported through `failures`."""
    for done, batch, errors in load_ahead(items, load, batch_size, workers):
        failures.add(message for _, message in errors)
        if batch is not None:
            yield done, batch


class _Done:
    """A result loaded in the main thread (--workers 0), with a future's result()."""

    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value


def _try_load(load: Callable, item: object) -> tuple[np.ndarray | None, str | None]:
    try:
        return load(item), None
    except ImageError as e:
        return None, str(e)
