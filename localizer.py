"""The localizer: a small fully convolutional network that finds house numbers in a whole photo,
so that the recognizer (model.py) reads a crop made from the found box by the published protocol.

Anchor-free, as CenterNet ("Objects as Points"): on a grid over the letterboxed input, a
heatmap says where a number's centre is (a sigmoid score per cell), and four box channels say
how far the number's edges are from the cell (TTFNet's encoding). Decoding (peaks, boxes,
non-maximum suppression) runs on the host, so the exported graph holds only convolutions, ReLU,
nearest upsampling, additions and a sigmoid: operators on ATC's ONNX list, fixed shapes.

The network with its architectures, reading its output, and building it from a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from svhn.boxes import corners, iou, nms
from svhn.exits import UserError
from svhn.network import NetworkSpec

INPUT_SIZE = 160  # the letterboxed input's side: SVHN's number boxes are 22 to 72 pixels wide at this size (5th-95th percentile)
FORMAT = "svhn-localizer"  # a checkpoint's "format" entry, what tells it from the recognizer's plain state dict


@dataclass(frozen=True)
class Arch:
    """Five stages of two 3x3 convolutions (the first with stride 2), to stride 32; a top-down
    path of 1x1 laterals and nearest 2x upsampling back to `stride`; a 3x3 head."""

    widths: tuple[int, int, int, int, int]
    neck: int
    stride: int

    @property
    def grid(self) -> int:
        return INPUT_SIZE // self.stride


ARCHS = {
    "tiny-s8": Arch((16, 32, 48, 64, 96), 48, 8),
    "tiny-s4": Arch((16, 32, 48, 64, 96), 48, 4),
    "nano-s8": Arch((12, 24, 32, 48, 64), 32, 8),
}
DEFAULT_ARCH = "tiny-s8"  # measured against the other two: see the README's localizer section


def _conv(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Localizer(nn.Module):
    """Input N x 3 x 160 x 160 (letterboxed, normalised as the recognizer's input); outputs the
    heatmap N x 1 x G x G (sigmoid scores) and the box map N x 4 x G x G (log of the distances, in
    cells, from each cell's centre to the box's left, top, right and bottom), G = 160 / stride."""

    def __init__(self, arch: str = DEFAULT_ARCH) -> None:
        super().__init__()
        self.arch_name = arch
        a = ARCHS[arch]
        widths = (3, *a.widths)
        self.stages = nn.ModuleList(nn.Sequential(_conv(widths[i], widths[i + 1], 2), _conv(widths[i + 1], widths[i + 1])) for i in range(5))
        self.used = [i for i in range(5) if 2 ** (i + 1) >= a.stride]  # stages at or below the output's resolution
        self.laterals = nn.ModuleList(nn.Conv2d(a.widths[i], a.neck, 1) for i in self.used)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = _conv(a.neck, a.neck)
        self.heatmap = nn.Conv2d(a.neck, 1, 1)
        self.box = nn.Conv2d(a.neck, 4, 1)
        nn.init.constant_(self.heatmap.bias, -4.6)  # a prior of 1 % on every cell, as focal-loss detectors start
        self.stride = a.stride

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        y = None
        for lateral, i in reversed(list(zip(self.laterals, self.used))):
            y = lateral(features[i]) if y is None else self.up(y) + lateral(features[i])
        y = self.head(y)
        return torch.sigmoid(self.heatmap(y)), self.box(y)


def flops_per_image(arch: str = DEFAULT_ARCH) -> int:
    """Multiply-adds counted twice, convolutions only (BatchNorm folds into them)."""
    a = ARCHS[arch]
    widths, side, total = (3, *a.widths), INPUT_SIZE, 0
    for i in range(5):
        side //= 2
        total += 2 * side * side * (widths[i] * 9 * widths[i + 1] + widths[i + 1] * 9 * widths[i + 1])
    for i in range(5):
        if 2 ** (i + 1) >= a.stride:
            s = INPUT_SIZE // 2 ** (i + 1)
            total += 2 * s * s * a.widths[i] * a.neck
    g = a.grid
    return total + 2 * g * g * (a.neck * 9 * a.neck + a.neck * 5)


def spec(arch: str = DEFAULT_ARCH) -> NetworkSpec:
    g = ARCHS[arch].grid
    return NetworkSpec("localizer", (INPUT_SIZE, INPUT_SIZE), (("heatmap", (1, g, g)), ("box", (4, g, g))), readings, agreement)


# --------------------------------------------------------------------------------------------
# Reading the output
# --------------------------------------------------------------------------------------------

SCORE_THRESHOLD = 0.3  # a peak below this is not a number (chosen on the validation images: README)
MAX_FOUND = 4
NMS_IOU = 0.5


@dataclass
class Found:
    """One number found: its box [left, top, width, height] in input pixels, and its score."""

    box: list[float]
    score: float


def boxes_at(box: torch.Tensor, stride: float) -> torch.Tensor:
    """The box map (N x 4 x G x G, log distances in cells from each cell's centre to the left,
    top, right and bottom edges) as corner boxes x0, y0, x1, y1 in input pixels, N x G x G x 4."""
    g = box.shape[-1]
    centre = (torch.arange(g, dtype=box.dtype, device=box.device) + 0.5) * stride
    d = torch.exp(box.clamp(max=8)) * stride
    cx, cy = centre.view(1, 1, g), centre.view(1, g, 1)
    return torch.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], dim=-1)


def smoothed(heat: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each cell's box averaged with its 3x3 neighbours', weighted by their scores: every cell
    near a centre learned the box (TTFNet), so their mean is steadier than the peak's alone."""
    w = heat[:, 0]
    n, g, _ = w.shape
    pw = nn.functional.pad(w, (1, 1, 1, 1))
    pb = nn.functional.pad(boxes.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate")
    total, acc = torch.zeros_like(w), torch.zeros(n, 4, g, g, dtype=boxes.dtype)
    for dy in range(3):
        for dx in range(3):
            cw = pw[:, dy : dy + g, dx : dx + g]
            total += cw
            acc += cw.unsqueeze(1) * pb[:, :, dy : dy + g, dx : dx + g]
    return (acc / total.clamp(min=1e-12).unsqueeze(1)).permute(0, 2, 3, 1)


def decode(outputs: Sequence[torch.Tensor], threshold: float = SCORE_THRESHOLD, max_found: int = MAX_FOUND) -> list[list[Found]]:
    """Per image, the numbers found, best first: the heatmap's local maxima (3x3) above
    `threshold`, the box each predicts, non-maximum suppression at NMS_IOU."""
    heat, box = (t.detach().double().cpu() for t in outputs[:2])
    n, _, g, _ = heat.shape
    peaks = heat == nn.functional.max_pool2d(heat, 3, 1, 1)
    all_boxes = smoothed(heat, boxes_at(box, INPUT_SIZE / g)).reshape(n, -1, 4)
    found = []
    for i in range(n):
        scores = torch.where(peaks[i, 0], heat[i, 0], torch.zeros_like(heat[i, 0])).flatten()
        top = torch.topk(scores, min(4 * max_found, scores.numel()))
        keep = top.values >= threshold
        cells, values = top.indices[keep], top.values[keep]
        boxes = all_boxes[i, cells]
        kept = nms(boxes, values, NMS_IOU)[:max_found] if len(cells) else []
        found.append([Found([float(boxes[k, 0]), float(boxes[k, 1]), float(boxes[k, 2] - boxes[k, 0]), float(boxes[k, 3] - boxes[k, 1])],
                            float(values[k])) for k in kept])
    return found


def readings(outputs: Sequence[torch.Tensor]) -> list[str]:
    """What each image reads as, for agreement between devices: the best box to the pixel, or '-'."""
    return [",".join(str(round(v)) for v in f[0].box) if f else "-" for f in decode(outputs)]


def agreement(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> dict:
    """How well the boxes a target finds match the reference's: the IoU of each image's best box
    (1 where neither finds one, 0 where only one does), its mean and minimum."""
    values = []
    ref_found, out_found = decode(ref), decode(out)
    for r, o in zip(ref_found, out_found):
        if not r and not o:
            values.append(1.0)
        elif not r or not o:
            values.append(0.0)
        else:
            values.append(float(iou(corners(torch.tensor([r[0].box])), corners(torch.tensor([o[0].box])))[0, 0]))
    n = len(values)
    return {"box_iou_mean": sum(values) / n if n else 1.0, "box_iou_min": min(values, default=1.0),
            "found_differ": sum((not r) != (not o) for r, o in zip(ref_found, out_found))}


# --------------------------------------------------------------------------------------------
# Training targets
# --------------------------------------------------------------------------------------------


def targets(boxes: Sequence[Sequence[float]], arch: str = DEFAULT_ARCH) -> torch.Tensor:
    """What the outputs should be for one image with these number boxes (input pixels): 6 x G x G,
    the heatmap (an elliptical Gaussian per box, sigma its width and height over 6), the box each
    cell should predict (corners x0, y0, x1, y1) and that cell's weight in the box loss (the
    Gaussian, where above 0.3: every cell near a number's centre learns its box, as TTFNet).
    Where numbers overlap, the smaller one's cells win."""
    g = ARCHS[arch].grid
    stride = INPUT_SIZE / g
    out = torch.zeros(6, g, g)
    centre = (torch.arange(g, dtype=torch.float32) + 0.5) * stride
    ys, xs = torch.meshgrid(centre, centre, indexing="ij")
    for left, top, w, h in sorted(boxes, key=lambda b: -b[2] * b[3]):
        if w <= 1 or h <= 1:
            continue
        cx, cy = left + w / 2, top + h / 2
        px, py = (min(int(cx // stride), g - 1) + 0.5) * stride, (min(int(cy // stride), g - 1) + 0.5) * stride  # the peak's cell
        sx, sy = max(w / 6, 0.4 * stride), max(h / 6, 0.4 * stride)
        gauss = torch.exp(-((xs - px) ** 2) / (2 * sx * sx) - ((ys - py) ** 2) / (2 * sy * sy))
        out[0] = torch.maximum(out[0], gauss)
        near = (gauss > 0.3) & (xs > left) & (xs < left + w) & (ys > top) & (ys < top + h)
        near |= gauss == gauss.max()
        out[1:5, near] = torch.tensor([left, top, left + w, top + h], dtype=torch.float32).view(4, 1)
        out[5, near] = gauss[near]
    return out


def loss(outputs: Sequence[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The penalty-reduced focal loss on the heatmap (alpha 2, beta 4; CenterNet), divided by the
    number of numbers; and 1 - GIoU of the boxes the cells near each centre predict, weighted by
    their Gaussian (TTFNet), times 5."""
    heat, box = outputs[0].float().clamp(1e-4, 1 - 1e-4), outputs[1].float()
    want, weight = target[:, :1], target[:, 5]
    centre = want.eq(1).float()
    focal = -(centre * (1 - heat) ** 2 * heat.log() + (1 - centre) * (1 - want) ** 4 * heat**2 * (1 - heat).log()).sum() / centre.sum().clamp(min=1)
    cells = weight > 0
    if cells.any():
        pred = boxes_at(box, INPUT_SIZE / box.shape[-1])[cells]
        true = target[:, 1:5].permute(0, 2, 3, 1)[cells]
        giou = (weight[cells] * (1 - generalized_iou(pred, true))).sum() / weight[cells].sum()
    else:
        giou = box.sum() * 0.0
    return focal + 5 * giou, {"heatmap": float(focal.detach()), "box": float(giou.detach())}


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of matching corner boxes (K x 4 each): IoU minus the share of the enclosing box that
    neither covers."""
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0).prod(1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(1)  # noqa: E731
    union_area = area(a) + area(b) - inter
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(1)
    return inter / union_area.clamp(min=1e-6) - (hull - union_area) / hull.clamp(min=1e-6)


# --------------------------------------------------------------------------------------------
# Building it from a checkpoint
# --------------------------------------------------------------------------------------------


class LocalizerWeightsError(UserError, ValueError):
    """A checkpoint that is not a localizer's; the message names the source and what it is."""


def checkpoint(model: Localizer) -> dict:
    """What a localizer-<step>.pth holds: the format, the architecture and fp32 CPU weights."""
    return {"format": FORMAT, "arch": model.arch_name, "input_size": INPUT_SIZE,
            "state_dict": {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone() for k, v in model.state_dict().items()}}


def from_checkpoint(obj: object, source: object = "checkpoint") -> Localizer:
    """The localizer a checkpoint holds (checked: its format, architecture, keys, shapes and
    finite weights), in eval mode on the CPU in fp32."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        if isinstance(obj, dict) and any(str(k).startswith("_hidden") for k in obj):
            raise LocalizerWeightsError(f"{source}: this is the recognizer's checkpoint (model-<step>.pth), not a localizer; pass it as --checkpoint")
        raise LocalizerWeightsError(f"{source}: not a localizer checkpoint (no \"format\": \"{FORMAT}\" entry)")
    arch, weights = obj.get("arch"), obj.get("state_dict")
    if arch not in ARCHS:
        raise LocalizerWeightsError(f"{source}: unknown localizer architecture {arch!r} (this version knows {', '.join(ARCHS)})")
    if obj.get("input_size") != INPUT_SIZE:
        raise LocalizerWeightsError(f"{source}: made for a {obj.get('input_size')}-pixel input, this version's is {INPUT_SIZE}")
    with torch.device("meta"):
        expected = Localizer(arch).state_dict()
    if not isinstance(weights, dict) or set(weights) != set(expected):
        got = set(weights) if isinstance(weights, dict) else set()
        raise LocalizerWeightsError(f"{source}: not the {arch} localizer's weights ({len(set(expected) - got)} keys missing, {len(got - set(expected))} unexpected)")
    for key, value in expected.items():
        got = weights[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(value.shape):
            raise LocalizerWeightsError(f"{source}: {key} has shape {tuple(getattr(got, 'shape', ()))}, expected {tuple(value.shape)}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise LocalizerWeightsError(f"{source}: NaN or Inf in {key}")
    model = Localizer(arch)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    return model.eval()
