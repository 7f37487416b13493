"""Box arithmetic for finding numbers: the number box of its digit boxes, IoU, non-maximum
suppression, and the letterbox that maps a photo onto the localizer's fixed input and back.

Boxes are [left, top, width, height] in pixels, as SVHN's digitStruct.mat writes them, unless a
name says corners (x0, y0, x1, y1), which is what the arithmetic works in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def union(boxes: Sequence[Sequence[float]]) -> list[float]:
    """The number box: the union of its digit boxes, [left, top, width, height]."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0 = b[:, 0].min(), b[:, 1].min()
    x1, y1 = (b[:, 0] + b[:, 2]).max(), (b[:, 1] + b[:, 3]).max()
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def corners(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] left, top, width, height to x0, y0, x1, y1."""
    return torch.cat([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], dim=-1)


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of corner boxes a (N x 4) and b (M x 4): N x M (0 where a box has no area)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    union_area = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union_area > 0, inter / union_area.clamp(min=1e-12), torch.zeros_like(inter))


def box_iou(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """IoU of two [left, top, width, height] boxes; 0 when either is missing."""
    if a is None or b is None:
        return 0.0
    return float(iou(corners(torch.tensor([a], dtype=torch.float64)), corners(torch.tensor([b], dtype=torch.float64)))[0, 0])


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """Indices of the corner boxes kept, best score first: each box suppresses the lower-scored
    ones that overlap it by more than `threshold` IoU (greedy, as torchvision.ops.nms)."""
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    overlaps = iou(boxes, boxes)
    kept: list[int] = []
    for i in order:
        if all(float(overlaps[i, k]) <= threshold for k in kept):
            kept.append(i)
    return kept


@dataclass(frozen=True)
class Letterbox:
    """How a photo of `photo_size` (width, height) sits in a square input of side `side`: scaled
    to `size` pixels with its aspect kept (the longer side fills the input), pasted at `offset`,
    the rest grey. Integer placement, so the boxes map back exactly to the pixels drawn."""

    photo_size: tuple[int, int]
    side: int

    @property
    def size(self) -> tuple[int, int]:
        w, h = self.photo_size
        s = self.side / max(w, h)
        return max(1, min(self.side, round(w * s))), max(1, min(self.side, round(h * s)))

    @property
    def offset(self) -> tuple[int, int]:
        return (self.side - self.size[0]) // 2, (self.side - self.size[1]) // 2

    def to_photo(self, box: Sequence[float]) -> list[float]:
        """An input-pixel [left, top, width, height] in the photo's own pixels, clipped to it."""
        (ox, oy), (sw, sh), (w, h) = self.offset, self.size, self.photo_size
        fx, fy = w / sw, h / sh
        x0 = min(max((box[0] - ox) * fx, 0.0), float(w))
        y0 = min(max((box[1] - oy) * fy, 0.0), float(h))
        x1 = min(max((box[0] + box[2] - ox) * fx, 0.0), float(w))
        y1 = min(max((box[1] + box[3] - oy) * fy, 0.0), float(h))
        return [x0, y0, x1 - x0, y1 - y0]

    def to_input(self, box: Sequence[float]) -> list[float]:
        (ox, oy), (sw, sh), (w, h) = self.offset, self.size, self.photo_size
        fx, fy = sw / w, sh / h
        return [box[0] * fx + ox, box[1] * fy + oy, box[2] * fx, box[3] * fy]


GREY = (128, 128, 128)  # the fill: 0 after the network's normalisation (x / 255 - 0.5) / 0.5, near enough


def letterbox(img: Image.Image, side: int) -> tuple[np.ndarray, Letterbox]:
    """The photo scaled into a side x side uint8 RGB array, aspect kept, centred on grey; and the
    geometry to map boxes back. Bilinear with Pillow's antialiasing when shrinking."""
    geometry = Letterbox(img.size, side)
    canvas = Image.new("RGB", (side, side), GREY)
    canvas.paste(img.resize(geometry.size, Image.BILINEAR), geometry.offset)
    return np.asarray(canvas, dtype=np.uint8).copy(), geometry
