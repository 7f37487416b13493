"""The published scoring rule, in one place for evaluation (eval_accuracy.py) and training's
validation: an image is read right when all five digit heads match its digits, 10 (no digit)
past the end; the strict figure also needs the length head to match.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from model import Reading
from svhn.labels import MAX_DIGITS, Record, head_targets


def digits_correct(digits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per image (N x 5 digit classes read, N x 5 wanted): whether every digit head is right."""
    return (digits == targets).all(dim=1)


def scored(record: Record, reading: Reading) -> dict:
    """One image's result: the truth, the reading (inference.py's fields) and whether it is right."""
    correct = bool(digits_correct(torch.tensor([reading.digits]), torch.tensor([record.target]))[0])
    return {
        "file": record.file, "true_number": record.number, "true_length": len(record.digits), **asdict(reading),
        "correct": correct, "correct_strict": correct and reading.length == len(record.digits), "boxes_used": record.boxes is not None,
    }


def summary(per_image: list[dict], left_out: dict[str, int], seconds: float, model_seconds: float) -> dict:
    """The accuracy report from the per-image results."""
    n = len(per_image)
    by_length: dict[int, list[int]] = {}
    position_ok = np.zeros(MAX_DIGITS)
    position_digits = np.zeros(MAX_DIGITS, dtype=int)
    confusion = np.zeros((MAX_DIGITS + 1, 7), dtype=int)  # true length 0..5 x read length 0..6
    for p in per_image:
        length = p["true_length"]
        target = head_targets([int(c) for c in p["true_number"]])[1:]
        by_length.setdefault(length, [0, 0])
        by_length[length][0] += p["correct"]
        by_length[length][1] += 1
        position_ok += np.array(p["digits"]) == np.array(target)
        position_digits += np.arange(MAX_DIGITS) < length
        confusion[length, p["length"]] += 1
    return {
        "images_scored": n,
        "accuracy": sum(p["correct"] for p in per_image) / n if n else None,
        "accuracy_strict": sum(p["correct_strict"] for p in per_image) / n if n else None,
        "accuracy_by_length": {k: {"images": v[1], "accuracy": v[0] / v[1]} for k, v in sorted(by_length.items())},
        "digit_accuracy_by_position": [
            {"position": i + 1, "accuracy": float(position_ok[i] / n) if n else None, "images_with_a_digit": int(position_digits[i])}
            for i in range(MAX_DIGITS)
        ],
        "length_accuracy": float(np.trace(confusion[:, : MAX_DIGITS + 1]) / n) if n else None,
        "length_confusion": {"rows": "true length 0..5", "columns": "read length 0..6", "counts": confusion.tolist()},
        "left_out": left_out,
        "images_per_s": n / seconds if seconds > 0 else None,
        "model_images_per_s": n / model_seconds if model_seconds > 0 else None,
    }
