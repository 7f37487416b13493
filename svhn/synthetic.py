"""The project's own synthetic house numbers: 1 to 5 rendered digits on a plaque, in many fonts
and colours, with perspective, blur, noise and JPEG artefacts, each labelled with its number and
a box per digit, so that a user with no data (and every test) can train for real.

A set is written as a folder in the labels.json form that eval_accuracy.py and train.py read,
and goes through the same label reader and the same crop as real photos.

Fonts: the TrueType fonts that matplotlib ships (DejaVu, STIX, Computer Modern) and those under
the system's font folders, each kept only if it draws the ten digits as ten different shapes.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from svhn.exits import UserError
from svhn.files import write_bytes_atomic


SYSTEM_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts", "/System/Library/Fonts", "C:/Windows/Fonts")


class FontError(UserError):
    """No font that draws digits could be found; the message says where we looked."""


def _draws_digits(path: Path) -> bool:
    """Whether a font draws 0-9 as ten visibly different glyphs (symbol fonts do not)."""
    try:
        font = ImageFont.truetype(str(path), 32)
    except OSError:
        return False
    shapes = set()
    for d in "0123456789":
        img = Image.new("L", (48, 48))
        ImageDraw.Draw(img).text((8, 4), d, font=font, fill=255)
        if img.getbbox() is None:
            return False
        shapes.add(img.tobytes())
    return len(shapes) == 10


@lru_cache(maxsize=1)
def find_fonts() -> tuple[Path, ...]:
    """Every usable font, sorted by path so that a seed gives the same set on the same machine."""
    candidates: list[Path] = []
    try:
        import matplotlib

        candidates += sorted((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("*.ttf"))
    except ImportError:
        pass
    for folder in SYSTEM_FONT_DIRS:
        candidates += sorted(Path(folder).glob("**/*.tt[fc]")) if Path(folder).is_dir() else []
    seen, fonts = set(), []
    for path in candidates:
        if path.name not in seen and _draws_digits(path):
            seen.add(path.name)
            fonts.append(path)
    if not fonts:
        raise FontError(
            f"no TrueType font that draws digits was found (looked in matplotlib's fonts and {', '.join(SYSTEM_FONT_DIRS)}): "
            "pip install matplotlib, or install a font package such as fonts-dejavu"
        )
    return tuple(fonts)


def _colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A plaque and an ink colour far enough apart in brightness to be read."""
    while True:
        plaque = tuple(rng.randrange(256) for _ in range(3))
        ink = tuple(rng.randrange(256) for _ in range(3))
        if abs(sum(plaque) - sum(ink)) > 180:
            return plaque, ink


def digit_row(rng: random.Random, n: int, height: int, gap: int, mounted: bool) -> tuple[list[int], list[int]]:
    """The gap after and the vertical drop of each of n digits, in pixels: set as type, `gap`
    apart in a row; or, when `mounted`, a third of the time as digits mounted one by one on a
    wall (SVHN's "3 2 7" climbing a step, "19 22" spread over a door): apart by 15 to 70 % of
    their height, half of those climbing or falling by up to a third of it per digit."""
    if not mounted or n < 2 or rng.random() >= 1 / 3:
        return [gap] * n, [0] * n
    gaps = [max(0, round(height * rng.uniform(0.15, 0.7) * rng.uniform(0.8, 1.2))) for _ in range(n)]
    slope = rng.uniform(-0.33, 0.33) if rng.random() < 0.5 else 0.0
    drops = [round(height * (i * slope + rng.uniform(-0.06, 0.06))) for i in range(n)]
    return gaps, drops


def _draw_digits(draw: ImageDraw.ImageDraw, number: str, font, glyphs: list, ink, x: int, top: int,
                 gaps: list[int], drops: list[int]) -> list[list[float]]:
    """Draw the digits from x, each `drop` below `top` and `gap` before the next; their boxes."""
    boxes = []
    for d, b, gap, drop in zip(number, glyphs, gaps, drops):
        draw.text((x - b[0], top + drop), d, font=font, fill=ink)
        boxes.append([float(x), float(top + drop + b[1]), float(b[2] - b[0]), float(b[3] - b[1])])
        x += b[2] - b[0] + gap
    return boxes


def render(number: str, rng: random.Random, fonts: tuple[Path, ...], mounted: bool = False) -> tuple[Image.Image, list[list[float]]]:
    """One photo of `number` and its digit boxes [left, top, width, height]. `mounted`: some of
    the time the digits are set apart and out of line (digit_row), as scenes need."""
    font = ImageFont.truetype(str(rng.choice(fonts)), rng.randint(24, 64))
    plaque, ink = _colours(rng)
    gap = rng.randint(-2, 10)
    glyphs = [font.getbbox(d) for d in number]
    widths = [b[2] - b[0] for b in glyphs]
    height = max(b[3] for b in glyphs) - min(b[1] for b in glyphs)
    gaps, drops = digit_row(rng, len(number), height, gap, mounted)
    pad_x, pad_y = rng.randint(4, 40), rng.randint(4, 30)
    w = sum(widths) + sum(gaps[:-1]) + 2 * pad_x
    h = height + max(drops) - min(drops) + 2 * pad_y
    img = Image.new("RGB", (max(w, 8), max(h, 8)), plaque)
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.5:  # a plaque border
        draw.rectangle([1, 1, img.width - 2, img.height - 2], outline=ink, width=rng.randint(1, 3))
    boxes = _draw_digits(draw, number, font, glyphs, ink, pad_x, pad_y - min(b[1] for b in glyphs) - min(drops), gaps, drops)
    # the plaque on a wider background, as a camera frames it
    scene = Image.new("RGB", (img.width + rng.randint(0, 60), img.height + rng.randint(0, 40)), tuple(rng.randrange(256) for _ in range(3)))
    ox, oy = rng.randint(0, scene.width - img.width), rng.randint(0, scene.height - img.height)
    scene.paste(img, (ox, oy))
    boxes = [[b[0] + ox, b[1] + oy, b[2], b[3]] for b in boxes]
    scene, boxes = _perspective(scene, boxes, rng)
    if rng.random() < 0.5:
        scene = scene.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.6)))
    if rng.random() < 0.5:
        a = np.asarray(scene, dtype=np.float32) + np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(2, 18), (scene.height, scene.width, 3))
        scene = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        buf = io.BytesIO()
        scene.save(buf, "JPEG", quality=rng.randint(15, 80))
        scene = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return scene, boxes


def _homography(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> np.ndarray:
    """The 8 coefficients of the projective map taking the four points a to the four points b."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(a, b):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    return np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64))


def _perspective(img: Image.Image, boxes: list[list[float]], rng: random.Random) -> tuple[Image.Image, list[list[float]]]:
    """A mild random perspective; each box becomes the bounding box of its moved corners."""
    w, h = img.size
    d = 0.12
    src = [(0, 0), (w, 0), (w, h), (0, h)]
    dst = [(x + rng.uniform(-d, d) * w, y + rng.uniform(-d, d) * h) for x, y in src]
    back = _homography(dst, src)  # Image.transform maps output points to input points
    f = _homography(src, dst)
    def move(x: float, y: float) -> tuple[float, float]:
        z = f[6] * x + f[7] * y + 1
        return (f[0] * x + f[1] * y + f[2]) / z, (f[3] * x + f[4] * y + f[5]) / z

    out = img.transform((w, h), Image.PERSPECTIVE, tuple(back), Image.BICUBIC, fillcolor=img.getpixel((0, 0)))
    moved = []
    for left, top, bw, bh in boxes:
        pts = [move(left, top), move(left + bw, top), move(left + bw, top + bh), move(left, top + bh)]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
        moved.append([round(x0, 1), round(y0, 1), round(min(float(w), max(xs)) - x0, 1), round(min(float(h), max(ys)) - y0, 1)])
    return out, moved


def stencil(img: Image.Image, rng: random.Random) -> Image.Image:
    """Every third pixel row darkened to a quarter, as on a dot-matrix sign or a slatted plaque:
    a look the stand-in checkpoint reads about half the time, for fine-tuning."""
    a = np.asarray(img).copy()
    a[::3] //= 4
    return Image.fromarray(a)


STYLES = {"plain": None, "stencil": stencil}


def random_number(rng: random.Random) -> str:
    """1 to 5 digits; a leading zero only for the rare plaques that have one (as '03')."""
    n = rng.choices([1, 2, 3, 4, 5], weights=[20, 30, 30, 15, 5])[0]
    first = str(rng.randint(0, 9)) if rng.random() < 0.05 else str(rng.randint(1, 9))
    return first + "".join(str(rng.randint(0, 9)) for _ in range(n - 1))


def _write_set(folder: str | Path, stamp: dict, count: int, seed: int, one) -> Path:
    """Write `count` photos and their labels.json into `folder`, each by one(i, rng, fonts, folder)
    (which saves the photo and returns its labels entry), unless a set of the same stamp is
    already there."""
    folder = Path(folder)
    fonts = find_fonts()
    stamp = {**stamp, "fonts": [f.name for f in fonts]}
    done = folder / "synthetic.json"
    if done.is_file() and json.loads(done.read_text()) == stamp:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)  # first: a render killed half way must not leave an older set's stamp over its files
    rng = random.Random(seed)
    labels = [one(i, rng, fonts, folder) for i in range(count)]
    write_bytes_atomic(folder / "labels.json", json.dumps(labels).encode())
    write_bytes_atomic(done, json.dumps(stamp).encode())  # last: the stamp says the set is whole
    return folder


def make_set(folder: str | Path, count: int, seed: int = 0, style=None) -> Path:
    """Write `count` synthetic photos and their labels.json into `folder` (reused when a set of
    the same count, seed and style is already there). `style(img, rng) -> img`, if given, is
    applied to every photo (a look the model has not seen, for fine-tuning)."""

    def one(i: int, rng: random.Random, fonts: tuple[Path, ...], folder: Path) -> dict:
        number = random_number(rng)
        img, boxes = render(number, rng, fonts)
        if style is not None:
            img = style(img, rng)
        name = f"{i:06d}.png"
        img.save(folder / name)
        return {"file": name, "label": number, "boxes": boxes}

    return _write_set(folder, {"count": count, "seed": seed, "style": getattr(style, "__name__", None)}, count, seed, one)


def set_name(count: int, seed: int, style: str = "plain") -> str:
    return f"synthetic-{style}-{count}-{seed}-{hashlib.sha256(','.join(f.name for f in find_fonts()).encode()).hexdigest()[:8]}"


def describe_fonts() -> str:
    fonts = find_fonts()
    return f"{len(fonts)} fonts ({', '.join(f.stem for f in fonts[:6])}{', ...' if len(fonts) > 6 else ''})"



# --------------------------------------------------------------------------------------------
# Scenes: whole street-view-like photos for the localizer
# --------------------------------------------------------------------------------------------

SCENES_VERSION = 3  # bumped whenever render_scene draws differently: a cached set of another version is rendered again
SCENE_MAX_SIDE = 320  # twice the localizer's input: room for its zoom augmentation
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZabcdefghkmnprstuvwxyz"


def _background(rng: random.Random, w: int, h: int) -> Image.Image:
    """A wall: a gradient, blurred noise, bricks, planks, or a flat colour with panels."""
    kind = rng.choice(["gradient", "noise", "bricks", "planks", "panels"])
    base = np.array(_wall_colour(rng), dtype=np.float32)
    g = np.random.default_rng(rng.randrange(2**32))
    if kind == "gradient":
        other = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        t = t[None, :, None] if t.size == w else t[:, None, None]
        a = base + (other - base) * np.broadcast_to(t, (h, w, 1))
    elif kind == "noise":
        small = g.normal(0, rng.uniform(10, 50), (max(2, h // 8), max(2, w // 8), 3)).astype(np.float32)
        a = base + np.asarray(Image.fromarray(np.clip(small + 128, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float32) - 128
    else:
        a = np.broadcast_to(base, (h, w, 3)).copy()
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    line = tuple(int(v) for v in np.clip(base * rng.uniform(0.4, 1.4), 0, 255))
    if kind == "bricks":
        bh = rng.randint(6, 24)
        bw = bh * rng.randint(2, 4)
        for row, y in enumerate(range(0, h, bh)):
            draw.line([(0, y), (w, y)], fill=line, width=rng.randint(1, 2))
            for x in range((row % 2) * bw // 2, w, bw):
                draw.line([(x, y), (x, y + bh)], fill=line, width=1)
    elif kind == "planks":
        step = rng.randint(5, 30)
        for x in range(0, w if rng.random() < 0.5 else 0, step):
            draw.line([(x, 0), (x, h)], fill=line, width=rng.randint(1, 3))
        for y in range(0, h if not w else 0, step):
            draw.line([(0, y), (w, y)], fill=line, width=rng.randint(1, 3))
    elif kind == "panels":
        for _ in range(rng.randint(1, 4)):
            x0, y0 = rng.randrange(w), rng.randrange(h)
            draw.rectangle([x0, y0, x0 + rng.randint(10, w), y0 + rng.randint(10, h)], outline=line,
                           fill=tuple(rng.randrange(256) for _ in range(3)) if rng.random() < 0.5 else None, width=rng.randint(1, 4))
    return img


def _wall_colour(rng: random.Random) -> tuple[int, int, int]:
    """Mostly the greys, browns and pale tints of walls; sometimes any colour."""
    if rng.random() < 0.3:
        return tuple(rng.randrange(256) for _ in range(3))
    grey = rng.randrange(20, 236)
    return tuple(int(min(255, max(0, grey + rng.randint(-30, 30)))) for _ in range(3))


def _paint(img: Image.Image, number: str, rng: random.Random, fonts: tuple[Path, ...], height: int,
           placed: list[list[float]]) -> list[list[float]] | None:
    """Digits painted straight onto the wall (no plaque), in an ink that stands out from it, at a
    free place; their boxes, or None when they do not fit (nothing drawn)."""
    font = ImageFont.truetype(str(rng.choice(fonts)), max(8, height))
    glyphs = [font.getbbox(d) for d in number]
    tall = max(b[3] for b in glyphs) - min(b[1] for b in glyphs)
    gap = rng.randint(0, max(1, height // 6))
    gaps, drops = digit_row(rng, len(number), tall, gap, mounted=True)
    width = sum(b[2] - b[0] for b in glyphs) + sum(gaps[:-1])
    tall += max(drops) - min(drops)
    if width >= img.width or tall >= img.height:
        return None
    x, y = rng.randint(0, img.width - width), rng.randint(0, img.height - tall)
    if _overlaps([x, y, width, tall], placed):
        return None
    wall = np.asarray(img.crop((x, y, x + width, y + tall)), dtype=np.float32).mean()
    ink = tuple(rng.randrange(0, 70) for _ in range(3)) if wall > 128 else tuple(rng.randrange(190, 256) for _ in range(3))
    boxes = _draw_digits(ImageDraw.Draw(img), number, font, glyphs, ink, x, y - min(b[1] for b in glyphs) - min(drops), gaps, drops)
    placed.append(_outline(boxes))
    return boxes


def _outline(boxes: list[list[float]]) -> list[float]:
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    return [x0, y0, max(b[0] + b[2] for b in boxes) - x0, max(b[1] + b[3] for b in boxes) - y0]


def _distractors(img: Image.Image, rng: random.Random, fonts: tuple[Path, ...]) -> None:
    """Letters, words and shapes that are not house numbers: the localizer must not find them."""
    draw = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(rng.choices([0, 1, 2, 3], weights=[3, 4, 2, 1])[0]):
        colour = tuple(rng.randrange(256) for _ in range(3))
        what = rng.random()
        x, y = rng.randrange(w), rng.randrange(h)
        if what < 0.45:
            font = ImageFont.truetype(str(rng.choice(fonts)), rng.randint(10, max(11, h // 3)))
            draw.text((x, y), "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 8))), font=font, fill=colour)
        elif what < 0.7:
            draw.ellipse([x, y, x + rng.randint(4, w // 3 + 4), y + rng.randint(4, h // 3 + 4)], outline=colour, width=rng.randint(1, 4))
        else:
            draw.line([(x, y), (rng.randrange(w), rng.randrange(h))], fill=colour, width=rng.randint(1, 6))


def _overlaps(box: list[float], others: list[list[float]]) -> bool:
    return any(box[0] < o[0] + o[2] and o[0] < box[0] + box[2] and box[1] < o[1] + o[3] and o[1] < box[1] + box[3] for o in others)


def render_scene(rng: random.Random, fonts: tuple[Path, ...]) -> tuple[Image.Image, list[tuple[str, list[list[float]]]]]:
    """One scene and its numbers, each (number, digit boxes): usually one number, sometimes two,
    sometimes none, each a rendered plaque (render()) scaled to 12 to 80 % of the scene's height
    (SVHN's number boxes span a median 61 %), on a wall with distractors; then the whole photo
    blurred, noised or JPEG-compressed as a camera would."""
    if rng.random() < 0.15:  # a close-up: the plaque fills the photo, as in a hand-taken picture or a crop
        number = random_number(rng)
        plaque, boxes = render(number, rng, fonts, mounted=True)
        k = min(1.0, SCENE_MAX_SIDE / max(plaque.size))
        size = (max(8, round(plaque.width * k)), max(8, round(plaque.height * k)))
        fx, fy = size[0] / plaque.width, size[1] / plaque.height
        return plaque.resize(size, Image.BILINEAR), [(number, [[round(b[0] * fx, 1), round(b[1] * fy, 1), round(b[2] * fx, 1), round(b[3] * fy, 1)] for b in boxes])]
    aspect = rng.choice([rng.uniform(1.6, 2.8)] * 3 + [rng.uniform(0.6, 1.6)])  # mostly SVHN's landscape frames
    w = rng.randint(96, SCENE_MAX_SIDE)
    h = max(32, min(SCENE_MAX_SIDE, int(w / aspect)))
    img = _background(rng, w, h)
    _distractors(img, rng, fonts)
    numbers: list[tuple[str, list[list[float]]]] = []
    placed: list[list[float]] = []
    for _ in range(rng.choices([0, 1, 2], weights=[1, 8, 1])[0]):
        number = random_number(rng)
        if rng.random() < 0.35:  # painted on the wall
            boxes = _paint(img, number, rng, fonts, max(8, int(rng.uniform(0.12, 0.75) * h)), placed)
            if boxes:
                numbers.append((number, [[round(v, 1) for v in b] for b in boxes]))
            continue
        plaque, boxes = render(number, rng, fonts, mounted=True)
        scale = rng.uniform(0.12, 0.8) * h / plaque.height
        if plaque.width * scale > 0.95 * w:
            scale = 0.95 * w / plaque.width
        size = (max(4, round(plaque.width * scale)), max(4, round(plaque.height * scale)))
        fx, fy = size[0] / plaque.width, size[1] / plaque.height
        ox, oy = rng.randint(0, w - size[0]), rng.randint(0, max(0, h - size[1]))
        boxes = [[ox + b[0] * fx, oy + b[1] * fy, b[2] * fx, b[3] * fy] for b in boxes]
        outline = [ox, oy, size[0], size[1]]
        if _overlaps(outline, placed):
            continue
        placed.append(outline)
        img.paste(plaque.resize(size, Image.BILINEAR), (ox, oy))
        numbers.append((number, [[round(v, 1) for v in b] for b in boxes]))
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.2)))
    if rng.random() < 0.4:
        a = np.asarray(img, dtype=np.float32) + np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(2, 12), (img.height, img.width, 3))
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return img, numbers


def make_scene_set(folder: str | Path, count: int, seed: int = 0) -> Path:
    """Write `count` scenes (JPEG) and their labels.json into `folder`: each entry's "numbers"
    lists every number with its digit boxes, and "label"/"boxes" repeat the first (an entry with
    no number has "numbers": [] and "label": ""). Reused when the same set is already there."""

    def one(i: int, rng: random.Random, fonts: tuple[Path, ...], folder: Path) -> dict:
        img, numbers = render_scene(rng, fonts)
        name = f"{i:06d}.jpg"
        img.save(folder / name, quality=rng.randint(40, 95))
        first = numbers[0] if numbers else ("", [])
        return {"file": name, "label": first[0], "boxes": first[1], "numbers": [{"label": n, "boxes": b} for n, b in numbers]}

    return _write_set(folder, {"scenes": count, "seed": seed, "version": SCENES_VERSION}, count, seed, one)


def scene_set_name(count: int, seed: int) -> str:
    return f"scenes-v{SCENES_VERSION}-{count}-{seed}-{hashlib.sha256(','.join(f.name for f in find_fonts()).encode()).hexdigest()[:8]}"
