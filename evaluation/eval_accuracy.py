#!/usr/bin/env python3
"""Whole-number accuracy on labelled house-number photos, by the published SVHN protocol.

    python evaluation/eval_accuracy.py --data svhn/test --device npu            # SVHN format 1
    python evaluation/eval_accuracy.py --data photos/ --labels labels.csv --errors 20 --sheet misread.png

--data is a folder of images; its labels come from --labels, else the folder's digitStruct.mat
(SVHN format 1, MATLAB v7.3 / HDF5), labels.json or labels.csv. A JSON labels file is a list of
{"file", "label" (or "number"), "boxes": [[left, top, width, height], ...] or null}; a CSV has the
columns file, number and optionally boxes (the same list, JSON-encoded).

Each image with digit boxes is cropped as the published evaluation did (union of the boxes, made
square, grown by 30 %, bicubic to 64x64, centre 54x54); an image without boxes, or every image with
--no-boxes, is read whole as inference.py reads it. Images with more than five digits are skipped.
An image is correct when all five digit heads match (10 past the end); the strict figure also
needs the length head to match.
Exit status: 0 done (even when images were left out, which the report counts), 2 usage errors.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cli  # noqa: E402
from device import environment  # noqa: E402
from images import ImageError, digit_crop, load_ahead, open_image, resize_and_crop  # noqa: E402
from model import BLANK, decode  # noqa: E402

MAX_DIGITS = 5


class LabelError(Exception):
    """Labels that cannot be read at all; the message names the file."""


@dataclass
class Record:
    file: str
    digits: list[int]  # 0..9, left to right
    boxes: list[list[float]] | None  # per digit [left, top, width, height], or None

    @property
    def number(self) -> str:
        return "".join(map(str, self.digits))

    @property
    def target(self) -> list[int]:
        """What the five digit heads should read: the digits, then 10 (no digit)."""
        return self.digits + [BLANK] * (MAX_DIGITS - len(self.digits))


# --------------------------------------------------------------------------------------------
# Labels: SVHN format 1 digitStruct.mat, or a JSON / CSV labels file
# --------------------------------------------------------------------------------------------


def read_digit_struct(path: Path) -> tuple[list[Record], list[str]]:
    """Records of a format-1 digitStruct.mat, plus one error line per record that could not be read.

    MATLAB v7.3 is HDF5: group digitStruct holds `name` (N references to uint16 character arrays)
    and `bbox` (N references to groups with label, left, top, width, height). A one-digit record
    stores each field as a 1x1 array; a longer one as n references to 1x1 arrays. Label 10 is 0.
    """
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError:
        raise LabelError(f"{path}: not an HDF5 file (SVHN's digitStruct.mat is MATLAB v7.3, i.e. HDF5)") from None
    with f:
        group = f.get("digitStruct")
        if not isinstance(group, h5py.Group) or "name" not in group or "bbox" not in group:
            raise LabelError(f"{path}: no digitStruct group with name and bbox in this file")
        names, bboxes = group["name"][()].ravel(), group["bbox"][()].ravel()
        if len(names) != len(bboxes):
            raise LabelError(f"{path}: {len(names)} names but {len(bboxes)} bbox records")
        records, errors = [], []
        # Every digit of every record is a reference to follow: about 30 s for SVHN's test set.
        progress = tqdm(zip(names, bboxes), total=len(names), desc=f"reading {path.name}", unit="rec", file=sys.stderr, disable=None)
        for i, (name_ref, bbox_ref) in enumerate(progress):
            try:
                file = "".join(chr(int(c)) for c in f[name_ref][()].ravel())
                box = f[bbox_ref]
                fields = {k: _field(f, box[k]) for k in ("label", "left", "top", "width", "height")}
            except (KeyError, ValueError, TypeError, OSError) as e:
                errors.append(f"{path}: record {i + 1} cannot be read ({type(e).__name__}: {e})")
                continue
            n = len(fields["label"])
            if any(len(v) != n for v in fields.values()):
                errors.append(f"{path}: record {i + 1} ({file}) has fields of different lengths")
                continue
            digits = [0 if int(v) == 10 else int(v) for v in fields["label"]]
            boxes = [[fields[k][j] for k in ("left", "top", "width", "height")] for j in range(n)]
            records.append(Record(file, digits, boxes))
    return records, errors


def _field(f, dataset) -> list[float]:
    values = dataset[()].ravel()
    if dataset.dtype.kind == "O":  # references, one per digit
        return [float(f[ref][()].ravel()[0]) for ref in values]
    return [float(v) for v in values]


def read_labels_file(path: Path) -> tuple[list[Record], list[str]]:
    """Records of a JSON or CSV labels file (see the module doc), plus one error line per bad entry."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LabelError(f"{path}: cannot be read ({e})") from None
    if path.suffix.lower() == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise LabelError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(entries, list):
            raise LabelError(f"{path}: expected a JSON list of {{file, label, boxes}} objects")
    else:
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or "file" not in rows[0] or not ({"number", "label"} & set(rows[0])):
            raise LabelError(f"{path}: expected CSV columns file, number and optionally boxes")
        entries = rows
    records, errors = [], []
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i + 1}"
        try:
            records.append(_record(entry))
        except (ValueError, TypeError, KeyError, AttributeError, json.JSONDecodeError) as e:
            errors.append(f"{where}: {e}")
    return records, errors


def _record(entry: dict) -> Record:
    file = entry["file"]
    number = str(entry.get("number", entry.get("label", ""))).strip()
    if not file or not number.isdigit():
        raise ValueError(f"needs a file and a number of digits (got file={file!r}, number={number!r})")
    boxes = entry.get("boxes")
    if isinstance(boxes, str):
        boxes = json.loads(boxes) if boxes.strip() else None
    if boxes is not None:
        boxes = [[float(v) for v in box] for box in boxes]
        if any(len(b) != 4 for b in boxes):
            raise ValueError(f"{file}: each box needs [left, top, width, height]")
        if len(boxes) != len(number):
            raise ValueError(f"{file}: {len(boxes)} boxes for {len(number)} digits")
    return Record(file, [int(c) for c in number], boxes)


def find_labels(data: Path, labels: str | None) -> Path:
    if labels:
        return Path(labels)
    for name in ("digitStruct.mat", "labels.json", "labels.csv"):
        if (data / name).is_file():
            return data / name
    raise LabelError(f"{data}: no labels (digitStruct.mat, labels.json or labels.csv) in this folder; pass --labels FILE")


def read_labels(path: Path) -> tuple[list[Record], list[str]]:
    if not path.is_file():
        raise LabelError(f"{path}: no such labels file")
    return read_digit_struct(path) if path.suffix.lower() == ".mat" else read_labels_file(path)


# --------------------------------------------------------------------------------------------
# Crops
# --------------------------------------------------------------------------------------------


def crop_for(record: Record, data: Path, use_boxes: bool) -> np.ndarray:
    """The 54x54 uint8 input for one record: the published box crop, or the whole image."""
    img = open_image(data / record.file, name=str(data / record.file))
    if not use_boxes or record.boxes is None:
        return resize_and_crop(img)
    w, h = img.size
    for left, top, bw, bh in record.boxes:
        if bw <= 0 or bh <= 0:
            raise ImageError(f"{data / record.file}: a digit box has no area ({left}, {top}, {bw}, {bh})")
        if left >= w or top >= h or left + bw <= 0 or top + bh <= 0:
            raise ImageError(f"{data / record.file}: a digit box lies outside the {w}x{h} image ({left}, {top}, {bw}, {bh})")
    return digit_crop(img, record.boxes)


def as_uint8(batch: torch.Tensor) -> np.ndarray:
    """Network input back to the uint8 crop it was made from (exact: x = (u/255 - 0.5)/0.5)."""
    return ((batch * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def contact_sheet(errors: list[dict], crops: dict[str, np.ndarray], path: Path, columns: int = 8) -> None:
    """Each misread crop at 2x with its true and read number beneath."""
    cell_w, cell_h, scale = 120, 150, 2
    columns = max(1, min(columns, len(errors)))
    rows = max(1, (len(errors) + columns - 1) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, e in enumerate(errors):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        crop = Image.fromarray(crops[e["file"]]).resize((54 * scale, 54 * scale), Image.NEAREST)
        sheet.paste(crop, (x + 6, y + 4))
        draw.text((x + 6, y + 114), f"true {e['true_number']}", fill=(0, 110, 0))
        draw.text((x + 6, y + 127), f"read {e['number'] or '-'} {e['confidence']:.2f}", fill=(190, 0, 0))
        draw.text((x + 6, y + 139), Path(e["file"]).name[:18], fill=(90, 90, 90))
    try:
        sheet.save(path)
    except (OSError, ValueError) as e:
        cli.die(f"{path}: cannot write the contact sheet ({e})", cli.EXIT_FAILED)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def score(records: list[Record], readings: list, left_out: dict[str, int], seconds: float, model_seconds: float) -> dict:
    """The accuracy report from the per-image readings (records and readings in the same order)."""
    per_image = []
    by_length: dict[int, list[int]] = {}
    position_ok = np.zeros(MAX_DIGITS)
    position_digits = np.zeros(MAX_DIGITS, dtype=int)
    confusion = np.zeros((MAX_DIGITS + 1, 7), dtype=int)  # true length 0..5 x read length 0..6
    for rec, r in zip(records, readings):
        target = rec.target
        correct = r.digits == target
        strict = correct and r.length == len(rec.digits)
        by_length.setdefault(len(rec.digits), [0, 0])
        by_length[len(rec.digits)][0] += correct
        by_length[len(rec.digits)][1] += 1
        position_ok += np.array(r.digits) == np.array(target)
        position_digits += np.arange(MAX_DIGITS) < len(rec.digits)
        confusion[len(rec.digits), r.length] += 1
        per_image.append(
            # the reading's fields are inference.py's (number, length, digits, confidence, ...)
            {"file": rec.file, "true_number": rec.number, "true_length": len(rec.digits), **r.as_dict(),
             "correct": correct, "correct_strict": strict, "boxes_used": rec.boxes is not None}
        )
    n = len(per_image)
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
        "images": per_image,
    }


def markdown(report: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    out = [
        cli.markdown_table(
            ["measure", "value"],
            [
                ["images scored", report["images_scored"]],
                ["whole-number accuracy (five digit heads)", pct(report["accuracy"])],
                ["whole-number accuracy, length head too", pct(report["accuracy_strict"])],
                ["length-head accuracy", pct(report["length_accuracy"])],
                ["left out", ", ".join(f"{k}: {v}" for k, v in report["left_out"].items() if v) or "none"],
                ["throughput (decode + model)", f"{report['images_per_s']:.1f} images/s" if report["images_per_s"] else "-"],
            ],
        ),
        "",
        cli.markdown_table(
            ["true length", "images", "accuracy"],
            [[k, v["images"], pct(v["accuracy"])] for k, v in report["accuracy_by_length"].items()],
        ),
        "",
        cli.markdown_table(
            ["position", "digit accuracy (10 past the end)", "images with a digit there"],
            [[p["position"], pct(p["accuracy"]), p["images_with_a_digit"]] for p in report["digit_accuracy_by_position"]],
        ),
        "",
        "length confusion (rows: true length, columns: read length)",
        "",
        cli.markdown_table(
            ["true \\ read"] + [str(c) for c in range(7)],
            [[t] + row for t, row in enumerate(report["length_confusion"]["counts"]) if any(row)],
        ),
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, metavar="DIR", help="folder of images (e.g. SVHN's test/)")
    group.add_argument("--labels", metavar="FILE", help="digitStruct.mat, .json or .csv (default: found in --data)")
    group.add_argument("--no-boxes", action="store_true", help="read whole images, ignoring the digit boxes")
    group.add_argument("--limit", type=int, default=None, help="score only the first N labelled images")
    group.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    group.add_argument("--workers", type=int, default=2, help="threads decoding and cropping ahead (default: %(default)s)")
    cli.add_model_args(parser)
    cli.add_device_args(parser)
    group = parser.add_argument_group("output")
    group.add_argument("--json", metavar="FILE", help="the report and every image scored")
    group.add_argument("--errors", type=int, default=0, metavar="N", help="list the N most confident misreads")
    group.add_argument("--sheet", metavar="FILE.png", help="contact sheet of the misread crops (with --errors N, or all)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.errors < 0 or (args.limit is not None and args.limit < 1):
        parser.error("--batch-size and --limit must be >= 1, --errors >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = Path(args.data)
    if not data.is_dir():
        cli.die(f"{data}: no such folder")
    try:
        labels = find_labels(data, args.labels)
        records, label_errors = read_labels(labels)
    except LabelError as e:
        cli.die(str(e))
    for line in label_errors:
        cli.error(line)
    left_out = {"unreadable labels": len(label_errors), "more than 5 digits": 0, "image failed": 0}
    usable = []
    for rec in records:
        if len(rec.digits) > MAX_DIGITS:
            left_out["more than 5 digits"] += 1
        else:
            usable.append(rec)
    if args.limit:
        usable = usable[: args.limit]
    if not usable:
        cli.die(f"{labels}: no labelled images to score", cli.EXIT_FAILED)

    model, checkpoint = cli.load_model_or_exit(args)
    device, dtype, mode = cli.setup_or_exit(args)
    rec = cli.recognizer(args, model, device, dtype)
    use_boxes = not args.no_boxes
    print(
        f"scoring {len(usable)} images of {data} ({labels.name}) on {device} {args.dtype}, "
        f"{'box crops' if use_boxes else 'whole images'}, checkpoint {checkpoint}",
        file=sys.stderr,
    )

    scored: list[Record] = []
    readings = []
    crops: dict[str, np.ndarray] = {}
    keep_crops = bool(args.sheet)
    start, model_seconds = time.perf_counter(), 0.0
    with tqdm(total=len(usable), unit="img", file=sys.stderr, disable=None) as bar:
        loader = load_ahead(usable, lambda r: crop_for(r, data, use_boxes), args.batch_size, args.workers)
        for done, batch, errors in loader:
            for _, message in errors:
                cli.error(message)
            left_out["image failed"] += len(errors)
            bar.update(len(done) + len(errors))
            if batch is None:
                continue
            t = time.perf_counter()
            got = decode(rec.logits(batch))
            model_seconds += time.perf_counter() - t
            if keep_crops:
                for r, reading, crop in zip(done, got, as_uint8(batch)):
                    if reading.digits != r.target:
                        crops[r.file] = crop
            scored += done
            readings += got
    report = score(scored, readings, left_out, time.perf_counter() - start, model_seconds)
    print(f"# Accuracy: {data} ({labels.name}), {'box crops' if use_boxes else 'whole images'}\n")
    print(f"device {device} ({environment(device)['device_name']}), {args.dtype}, fp32 conv {mode['conv']} / matmul {mode['matmul']}; checkpoint {checkpoint}\n")
    print(markdown(report))
    misread = sorted((p for p in report["images"] if not p["correct"]), key=lambda p: -p["confidence"])
    if args.errors:
        print(f"\n{min(args.errors, len(misread))} of {len(misread)} misread images, most confident first\n")
        rows = [[p["file"], p["true_number"], p["number"] or "-", f"{p['confidence']:.3f}"] for p in misread[: args.errors]]
        print(cli.markdown_table(["file", "true", "read", "confidence"], rows))
    if args.sheet:
        contact_sheet(misread[: args.errors] if args.errors else misread, crops, Path(args.sheet))
        cli.note(f"contact sheet of {len(misread[: args.errors] if args.errors else misread)} misread crops: {args.sheet}")
    if args.json:
        cli.write_json(
            args.json,
            {"data": str(data), "labels": str(labels), "crop": "boxes" if use_boxes else "whole image", "checkpoint": str(checkpoint),
             "device": str(device), "dtype": args.dtype, "fp32_mode": mode, "settings": rec.settings,
             "environment": environment(device), **report},
        )
    return 0


if __name__ == "__main__":
    cli.run(main)
