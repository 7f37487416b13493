"""The localizer as a training task (svhn.training.Task): its data (labelled folders with digit
boxes and the project's synthetic scenes), its batches (photos zoomed, moved and recoloured at
random, then letterboxed), its loss (CenterNet's) and its validation score (the share of images
whose best found box overlaps the true number box by IoU >= 0.5, or where nothing is found when
there is no number), sharded over ranks."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import localizer as L
from svhn import exits
from svhn.boxes import GREY, box_iou, letterbox
from svhn.distributed import Ranks
from svhn.files import write_bytes_atomic
from svhn.images import ImageError, open_image, random_input, to_tensor
from svhn.labels import LabelError, labelled_set
from svhn.synthetic import SCENE_MAX_SIDE, describe_fonts, make_scene_set, scene_set_name
from svhn.text import printable
from svhn.training import TrainingError, held_out

IOU_GOOD = 0.5  # the bar for a found box
REAL_SHARE = 0.7  # of each batch, when there are real photos and scenes: the scenes teach shapes, the photos the look of streets


@dataclass(frozen=True)
class SceneData:
    """Where the localizer's training data come from (train.py's data flags)."""

    data: tuple[str, ...] = ()
    synthetic: int = 0
    val: str | None = None
    val_fraction: float = 0.25
    val_fold: int = 0
    cache: Path = Path.home() / ".cache" / "svhn-ascend"
    workers: int = 2
    seed: int = 0


@dataclass
class Photos:
    """Whole photos (uint8 H x W x 3, at most SCENE_MAX_SIDE on a side) and each one's number boxes."""

    images: list[np.ndarray]
    boxes: list[list[list[float]]]
    files: list[str]
    labels: list[tuple[Path, dict]] = field(default_factory=list)  # (data folder, labels entry) of those with a number, for validation.json

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index) -> "Photos":
        chosen = {self.files[i] for i in index}
        pick = lambda xs: [xs[i] for i in index]  # noqa: E731
        return Photos(pick(self.images), pick(self.boxes), pick(self.files), [(f, e) for f, e in self.labels if str(f / e["file"]) in chosen])

    def write_labels(self, out: Path) -> list[Path]:
        """The photos' labels, one labels.json-format file per data folder (validation-<folder>.json
        in `out`), so that eval_accuracy.py --labels scores exactly these photos."""
        written = []
        for folder in dict.fromkeys(f for f, _ in self.labels):
            path = out / f"validation-{folder.name}.json"
            write_bytes_atomic(path, json.dumps([e for f, e in self.labels if f == folder], indent=1).encode())
            written.append(path)
        return written


def _load(folder: Path, file: str, boxes: list[list[float]]) -> tuple[np.ndarray, list[list[float]]]:
    img = open_image(folder / file, name=printable(folder / file))
    k = min(1.0, SCENE_MAX_SIDE / max(img.size))
    if k < 1:
        size = (max(1, round(img.width * k)), max(1, round(img.height * k)))
        fx, fy = size[0] / img.width, size[1] / img.height
        img = img.resize(size, Image.BILINEAR)
        boxes = [[b[0] * fx, b[1] * fy, b[2] * fx, b[3] * fy] for b in boxes]
    return np.asarray(img, dtype=np.uint8), boxes


def load_photos(folder: Path, workers: int, report) -> Photos:
    """The photos of a labelled folder that have number boxes; one line to `report` per entry
    that cannot be used (unreadable image, no boxes, a box outside the image)."""
    try:
        found = labelled_set(folder)
    except LabelError as e:
        raise TrainingError(str(e)) from None
    for line in found.errors + found.too_long:
        report(line)
    usable = [r for r in found.records if r.number_boxes is not None]
    if len(usable) < len(found.records):
        report(f"{printable(found.labels)}: {len(found.records) - len(usable)} entries without digit boxes left out (the localizer learns from boxes)")

    def one(record):
        try:
            return _load(folder, record.file, record.number_boxes)
        except ImageError as e:
            return str(e)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        loaded = list(pool.map(one, usable))
    photos = Photos([], [], [])
    for record, got in zip(usable, loaded):
        if isinstance(got, str):
            report(got)
            continue
        image, boxes = got
        h, w = image.shape[:2]
        if any(b[2] <= 0 or b[3] <= 0 or b[0] >= w or b[1] >= h or b[0] + b[2] <= 0 or b[1] + b[3] <= 0 for b in boxes):
            report(f"{printable(folder / record.file)}: a number box lies outside the {w}x{h} image or has no area; left out")
            continue
        photos.images.append(image)
        photos.boxes.append(boxes)
        photos.files.append(str(folder / record.file))
        if record.digits:  # what eval_accuracy.py can score: a photo with a number
            photos.labels.append((folder, {"file": record.file, "label": record.number, "boxes": record.boxes}))
    return photos


def load_data(spec: SceneData, ranks: Ranks) -> tuple[Photos, Photos, Photos]:
    """(real training photos, synthetic scenes, validation photos). Validation is --val, else a
    seeded fraction of the real photos (the scenes only train), else of the scenes."""
    folders = [Path(d) for d in spec.data]
    for folder in folders + ([Path(spec.val)] if spec.val else []):
        if not folder.is_dir():
            raise TrainingError(f"{printable(folder)}: no such folder")
    report = exits.error if ranks.main else (lambda line: None)
    scenes_folder = spec.cache / scene_set_name(spec.synthetic, spec.seed)
    if spec.synthetic:
        if ranks.main:
            exits.note(f"synthetic scenes: {spec.synthetic}, seed {spec.seed}, {describe_fonts()}")
            try:
                make_scene_set(scenes_folder, spec.synthetic, spec.seed)
            except OSError as e:
                raise TrainingError(f"{printable(spec.cache)}: the scene cache cannot be written ({e.strerror or e}); pass --cache DIR on a writable disk") from None
        ranks.barrier()
    real = _join([load_photos(f, spec.workers, report) for f in folders])
    scenes = load_photos(scenes_folder, spec.workers, report) if spec.synthetic else Photos([], [], [])
    if spec.val:
        val = load_photos(Path(spec.val), spec.workers, report)
    else:
        pool = real if len(real) else scenes
        val_index, train_index = held_out(len(pool), spec.val_fraction, spec.seed, spec.val_fold)
        val, rest = pool.subset(val_index), pool.subset(train_index)
        real, scenes = (rest, scenes) if len(real) else (real, rest)
    if len(real) + len(scenes) == 0 or len(val) == 0:
        raise TrainingError(f"no usable training or validation photos with boxes ({len(real) + len(scenes)} and {len(val)})")
    return real, scenes, val


def _join(sets: list[Photos]) -> Photos:
    return Photos([i for s in sets for i in s.images], [b for s in sets for b in s.boxes], [f for s in sets for f in s.files],
                  [e for s in sets for e in s.labels])


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def place(image: np.ndarray, boxes: list[list[float]], rng: np.random.Generator, side: int = L.INPUT_SIZE) -> tuple[np.ndarray, list[list[float]]]:
    """The photo zoomed (0.5 to 1.6 times the letterbox's scale) and moved at random inside the
    side x side input, every number kept whole inside it; grey around, as the letterbox fills."""
    h, w = image.shape[:2]
    for zoom in (math.exp(rng.uniform(math.log(0.5), math.log(1.6))), 1.0):
        size = (max(1, round(w * side / max(w, h) * zoom)), max(1, round(h * side / max(w, h) * zoom)))
        fx, fy = size[0] / w, size[1] / h
        lo_x, hi_x = sorted((0, side - size[0]))
        lo_y, hi_y = sorted((0, side - size[1]))
        if boxes:
            lo_x, hi_x = max(lo_x, -min(b[0] for b in boxes) * fx), min(hi_x, side - max(b[0] + b[2] for b in boxes) * fx)
            lo_y, hi_y = max(lo_y, -min(b[1] for b in boxes) * fy), min(hi_y, side - max(b[1] + b[3] for b in boxes) * fy)
        if lo_x <= hi_x and lo_y <= hi_y:
            break
    ox, oy = (int(math.floor(rng.uniform(lo_x, hi_x))), int(math.floor(rng.uniform(lo_y, hi_y)))) if zoom != 1.0 else ((side - size[0]) // 2, (side - size[1]) // 2)
    canvas = Image.new("RGB", (side, side), GREY)
    canvas.paste(Image.fromarray(image).resize(size, Image.BILINEAR), (ox, oy))
    return np.asarray(canvas, dtype=np.uint8), [[b[0] * fx + ox, b[1] * fy + oy, b[2] * fx, b[3] * fy] for b in boxes]


def beside_the_number(image: np.ndarray, boxes: list[list[float]], rng: np.random.Generator) -> np.ndarray | None:
    """The part of a real photo to the left or right of its number, when wide enough: a
    negative with a real wall's texture (None when there is no such part)."""
    h, w = image.shape[:2]
    x0 = int(min(b[0] for b in boxes)) - 2
    x1 = int(math.ceil(max(b[0] + b[2] for b in boxes))) + 2
    sides = [(0, x0)] * (x0 > h // 2) + [(x1, w)] * (w - x1 > h // 2)
    if not sides:
        return None
    a, b = sides[rng.integers(len(sides))]
    return image[:, a:b]


def around_the_number(image: np.ndarray, boxes: list[list[float]], rng: np.random.Generator) -> tuple[np.ndarray, list[list[float]]]:
    """A window of the photo 1.1 to 2 times the size of its number box, the number inside it
    at random: the close-ups users hand in (plaques, crops such as SVHN's 64x64 ones)."""
    h, w = image.shape[:2]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    cw, ch = (x1 - x0) * rng.uniform(1.1, 2.0), (y1 - y0) * rng.uniform(1.1, 2.0)
    left = int(max(0, math.floor(x0 - rng.uniform(0, cw - (x1 - x0)))))
    top = int(max(0, math.floor(y0 - rng.uniform(0, ch - (y1 - y0)))))
    right, bottom = int(min(w, max(math.ceil(x1), left + cw))), int(min(h, max(math.ceil(y1), top + ch)))
    return image[top:bottom, left:right], [[b[0] - left, b[1] - top, b[2], b[3]] for b in boxes]


def pasted(number: np.ndarray, box: list[float], wall: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[list[float]]]:
    """Copy-paste (Ghiasi et al.): a real number, cut out of its photo with a margin, pasted at a
    random scale and place onto a wall (a real photo's part beside its number, stretched to a
    street-view frame): the look of real numbers in new places and sizes, with exact boxes."""
    h = int(rng.integers(60, 200))
    w = int(h * rng.uniform(1.4, 2.6))
    canvas = Image.fromarray(wall).resize((w, h), Image.BILINEAR)
    ph, pw = number.shape[:2]
    k = rng.uniform(0.3, 0.85) * h / ph
    if pw * k > 0.9 * w:
        k = 0.9 * w / pw
    size = (max(2, round(pw * k)), max(2, round(ph * k)))
    x, y = int(rng.integers(0, w - size[0] + 1)), int(rng.integers(0, h - size[1] + 1))
    canvas.paste(Image.fromarray(number).resize(size, Image.BILINEAR), (x, y))
    fx, fy = size[0] / pw, size[1] / ph
    return np.asarray(canvas, dtype=np.uint8), [[x + box[0] * fx, y + box[1] * fy, box[2] * fx, box[3] * fy]]


def cut_out(image: np.ndarray, boxes: list[list[float]], rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """The number with a margin of 5 to 30 % of its height around it, and its box in the cut-out."""
    h, w = image.shape[:2]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    m = rng.uniform(0.05, 0.3) * (y1 - y0)
    left, top = int(max(0, math.floor(x0 - m))), int(max(0, math.floor(y0 - m)))
    right, bottom = int(min(w, math.ceil(x1 + m))), int(min(h, math.ceil(y1 + m)))
    return image[top:bottom, left:right], [x0 - left, y0 - top, x1 - x0, y1 - y0]


def recolour(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast, brightness and per-channel gain at random; sometimes grey, sometimes inverted."""
    x = a.astype(np.float32)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.6, 1.4) + mean + rng.uniform(-30, 30)
    x = x * rng.uniform(0.85, 1.15, size=3)
    if rng.random() < 0.15:
        x = np.repeat(x.mean(axis=2, keepdims=True), 3, axis=2)
    if rng.random() < 0.1:
        x = 255 - x
    return np.clip(x, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


class LocalizerTask:
    """The localizer's batches, loss and validation for svhn.training."""

    name = "localizer"
    score_name = f"share found (IoU >= {IOU_GOOD})"
    checkpoint_prefix = "localizer"

    def __init__(self, real: Photos, scenes: Photos, val: Photos, arch: str, batch_size: int, seed: int, ranks: Ranks) -> None:
        self.real, self.scenes, self.val, self.arch = real, scenes, val, arch
        self.batch_size, self.seed, self.ranks = batch_size, seed, ranks
        self.real_share = REAL_SHARE if len(real) and len(scenes) else (1.0 if len(real) else 0.0)
        self.val_inputs, self.val_truth = self._letterboxed(val)

    @staticmethod
    def _letterboxed(photos: Photos) -> tuple[np.ndarray, list[list[list[float]]]]:
        """The validation photos as inference.py feeds them, and their number boxes in input pixels."""
        letterboxed = [letterbox(Image.fromarray(im), L.INPUT_SIZE) for im in photos.images]
        inputs = np.stack([a for a, _ in letterboxed]) if letterboxed else np.zeros((0, L.INPUT_SIZE, L.INPUT_SIZE, 3), np.uint8)
        return inputs, [[g.to_input(b) for b in boxes] for (_, g), boxes in zip(letterboxed, photos.boxes)]

    def describe(self) -> str:
        return (f"the {self.arch} localizer on {len(self.real)} photos and {len(self.scenes)} synthetic scenes, "
                f"validating on {len(self.val)}")

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, list[list[float]]]:
        """One training input: a real photo (REAL_SHARE of the time, when there are both) or a
        scene, mirrored half the time (a mirrored number is still where a number is), placed and
        recoloured; a tenth of the real ones become the wall beside their number, a fifth a
        close-up around it, a quarter their number pasted onto another photo's wall."""
        pool = self.real if rng.random() < self.real_share else self.scenes
        i = int(rng.integers(len(pool)))
        image, boxes = pool.images[i], pool.boxes[i]
        if rng.random() < 0.5:
            w = image.shape[1]
            image, boxes = np.ascontiguousarray(image[:, ::-1]), [[w - b[0] - b[2], b[1], b[2], b[3]] for b in boxes]
        if pool is self.real and boxes:
            draw = rng.random()
            if draw < 0.1:
                side = beside_the_number(image, boxes, rng)
                if side is not None:
                    image, boxes = side, []
            elif draw < 0.3:
                image, boxes = around_the_number(image, boxes, rng)
            elif draw < 0.55 and len(boxes) == 1:
                j = int(rng.integers(len(pool)))
                wall = beside_the_number(pool.images[j], pool.boxes[j], rng) if pool.boxes[j] else pool.images[j]
                if wall is not None and min(wall.shape[:2]) >= 8:
                    image, boxes = pasted(*cut_out(image, boxes, rng), wall, rng)
        return place(recolour(image, rng), boxes, rng)  # recoloured before placing: the letterbox's grey stays the grey inference.py fills with

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A pure function of (seed, step, rank), so --resume continues exactly."""
        rng = np.random.default_rng([self.seed, step, self.ranks.rank])
        samples = [self.sample(rng) for _ in range(self.batch_size)]
        return to_tensor([a for a, _ in samples]), torch.stack([L.targets(b, self.arch) for _, b in samples])

    def random_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return random_input(n, seed=0, size=(L.INPUT_SIZE, L.INPUT_SIZE)), torch.stack([L.targets([[40, 60, 60, 40]], self.arch)] * n)

    @staticmethod
    def loss(outputs, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return L.loss(outputs, targets)

    def validate(self, net: nn.Module, ranks: Ranks, channels_last: bool) -> dict:
        """Over every rank's shard of the validation photos, letterboxed as inference.py does:
        found right (best box IoU >= 0.5 with a true number box; nothing found where there is
        none), and the IoU summed for the mean; counts summed over ranks."""
        net.eval()
        good = total = iou_sum = 0.0
        shard = np.arange(ranks.rank, len(self.val), ranks.world)
        with torch.inference_mode():
            for start in range(0, len(shard), 64):
                index = shard[start : start + 64]
                x = to_tensor(self.val_inputs[index]).to(ranks.device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                for i, found in zip(index, L.decode(net(x))):
                    truth = self.val_truth[i]
                    if not truth:
                        good += not found
                        iou_sum += not found
                    else:
                        best = max(box_iou(found[0].box, t) for t in truth) if found else 0.0
                        good += best >= IOU_GOOD
                        iou_sum += best
                    total += 1
        net.train()
        good, total, iou_sum = ranks.sum([good, total, iou_sum])
        return {"score": good / total, "counts": {"val_good": good, "val_scored": total, "val_mean_iou": iou_sum / total},
                "summary": f"{int(good)} of {int(total)}, mean IoU {iou_sum / total:.3f}"}

    @staticmethod
    def checkpoint(model: nn.Module) -> dict:
        return L.checkpoint(model)  # the engine hands over the bare module, never its DDP wrapper

    def flops_per_image(self) -> int:
        return L.flops_per_image(self.arch)
