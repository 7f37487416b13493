"""House-number labels: SVHN format 1 (`digitStruct.mat`), or a JSON / CSV labels file.

A JSON labels file is a list of {"file", "label" (or "number"), "boxes": [[left, top, width,
height], ...] or null}, and where an image holds several numbers or none (the localizer's
scenes), "numbers": [{"label", "boxes"}, ...] lists each ("label"/"boxes" are then its first,
or "" for none); a CSV has the columns file, number (or label) and optionally boxes (the
same list, JSON-encoded). Every record is checked on its own: one that cannot be used becomes an
error line naming the file and the entry, and the others are still read.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from svhn.exits import UserError

from model import BLANK
from svhn.boxes import union
from svhn.text import one_line, printable

MAX_DIGITS = 5
LABEL_FILES = ("digitStruct.mat", "labels.json", "labels.csv")


class LabelError(UserError):
    """Labels that cannot be read at all; the message names the file."""


@dataclass
class Record:
    file: str
    digits: list[int]  # 0..9, left to right
    boxes: list[list[float]] | None  # per digit [left, top, width, height], or None
    numbers: list[list[list[float]]] | None = None  # every number's digit boxes, where the labels list several (or none)

    @property
    def number_boxes(self) -> list[list[float]] | None:
        """Every number's box (the union of its digit boxes) in the image, [] where it holds
        none; None when the labels give no boxes."""
        if self.numbers is not None:
            return [union(b) for b in self.numbers]
        return [union(self.boxes)] if self.boxes else None

    @property
    def number(self) -> str:
        return "".join(map(str, self.digits))

    @property
    def target(self) -> list[int]:
        """What the five digit heads should read: the digits, then 10 (no digit)."""
        return head_targets(self.digits)[1:]


def head_targets(digits: list[int]) -> list[int]:
    """What the six heads should read for these digits: the length, then the digits, then 10."""
    return [len(digits)] + digits + [BLANK] * (MAX_DIGITS - len(digits))


def _check_boxes(boxes: list[list[float]], n_digits: int) -> None:
    if len(boxes) != n_digits:
        raise ValueError(f"{len(boxes)} boxes for {n_digits} digits")
    for box in boxes:
        if len(box) != 4:
            raise ValueError("each box needs [left, top, width, height]")
        if not all(math.isfinite(v) for v in box):
            raise ValueError(f"a box holds NaN or Infinity ({box})")


# --------------------------------------------------------------------------------------------
# SVHN format 1
# --------------------------------------------------------------------------------------------


def read_digit_struct(path: Path) -> tuple[list[Record], list[str], list[str]]:
    """Records of a format-1 digitStruct.mat, one error line per record left out, and warnings (none).

    MATLAB v7.3 is HDF5: group digitStruct holds `name` (N references to uint16 character arrays)
    and `bbox` (N references to groups with label, left, top, width, height). A one-digit record
    stores each field as a 1x1 array; a longer one as n references to 1x1 arrays. Labels are
    1..10, 10 meaning the digit 0.
    """
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError:
        raise LabelError(f"{printable(path)}: not an HDF5 file (SVHN's digitStruct.mat is MATLAB v7.3, i.e. HDF5)") from None
    with f:
        group = f.get("digitStruct")
        if not isinstance(group, h5py.Group) or "name" not in group or "bbox" not in group:
            raise LabelError(f"{printable(path)}: no digitStruct group with name and bbox in this file")
        names, bboxes = group["name"][()].ravel(), group["bbox"][()].ravel()
        if len(names) != len(bboxes):
            raise LabelError(f"{printable(path)}: {len(names)} names but {len(bboxes)} bbox records")
        records, errors = [], []
        # Every digit of every record is a reference to follow: about 30 s for SVHN's test set.
        progress = tqdm(zip(names, bboxes), total=len(names), desc=f"reading {path.name}", unit="rec", file=sys.stderr, disable=None)
        for i, (name_ref, bbox_ref) in enumerate(progress):
            where, file = f"{printable(path)}: record {i + 1}", "?"
            try:
                file = "".join(chr(int(c)) for c in f[name_ref][()].ravel())
                box = f[bbox_ref]
                fields = {k: _field(f, box[k]) for k in ("label", "left", "top", "width", "height")}
                n = len(fields["label"])
                if any(len(v) != n for v in fields.values()):
                    raise ValueError("fields of different lengths")
                labels = fields["label"]
                if not all(math.isfinite(v) and v == int(v) and 1 <= v <= 10 for v in labels):
                    raise ValueError(f"digit labels must be whole numbers 1..10 (10 for 0), got {labels}")
                boxes = [[fields[k][j] for k in ("left", "top", "width", "height")] for j in range(n)]
                _check_boxes(boxes, n)
            except Exception as e:  # h5py raises many kinds on a damaged file; each record stands alone
                errors.append(f"{where} ({printable(file)}) left out: {type(e).__name__}: {one_line(e, 160)}")
                continue
            records.append(Record(file, [int(v) % 10 for v in labels], boxes))
    return records, errors, []


def _field(f, dataset) -> list[float]:
    values = dataset[()].ravel()
    if dataset.dtype.kind == "O":  # references, one per digit
        return [float(f[ref][()].ravel()[0]) for ref in values]
    return [float(v) for v in values]


# --------------------------------------------------------------------------------------------
# JSON and CSV
# --------------------------------------------------------------------------------------------


def read_labels_file(path: Path) -> tuple[list[Record], list[str], list[str]]:
    """Records of a JSON or CSV labels file (see the module doc), one error line per entry left
    out, and warnings about entries that may not say what was meant."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: Excel's "CSV UTF-8" starts with a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise LabelError(f"{printable(path)}: cannot be read ({one_line(e)})") from None
    if path.suffix.lower() == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise LabelError(f"{printable(path)}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(entries, list):
            raise LabelError(f"{printable(path)}: expected a JSON list of {{file, label, boxes}} objects")
    else:
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or "file" not in rows[0] or not ({"number", "label"} & set(rows[0])):
            raise LabelError(f"{printable(path)}: expected CSV columns file, number and optionally boxes")
        entries = rows
    records, errors, seen, numeric = [], [], {}, 0
    for i, entry in enumerate(entries):
        file = entry.get("file") if isinstance(entry, dict) else None
        where = f"{printable(path)}: entry {i + 1}" + (f" ({printable(file)})" if isinstance(file, str) else "")
        try:
            record, was_number = _record(entry)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            errors.append(f"{where} left out: {one_line(e, 160)}")
            continue
        if record.file in seen:
            errors.append(f"{where} left out: a second label for this file (first at entry {seen[record.file]})")
            continue
        seen[record.file] = i + 1
        numeric += was_number
        records.append(record)
    warnings = []
    if numeric:
        warnings.append(
            f"{printable(path)}: {numeric} labels are JSON numbers, not strings; a leading 0 (as in \"03\") "
            "cannot survive that, so check them or write them as strings"
        )
    return records, errors, warnings


def _record(entry: object) -> tuple[Record, bool]:
    if not isinstance(entry, dict):
        raise TypeError(f"expected an object with file and label, got {type(entry).__name__}")
    file = entry.get("file")
    if not isinstance(file, str) or not file.strip():
        raise TypeError(f"'file' must be a file name, got {file!r}"[:160])
    numbers = entry.get("numbers")
    if numbers is not None:  # a scene: every number in the image, perhaps none
        if not isinstance(numbers, list) or not all(isinstance(n, dict) for n in numbers):
            raise ValueError("numbers must be a list of {label, boxes} objects")
        each = [_number(n.get("label"), n.get("boxes"), required=True) for n in numbers]
        if not each:
            return Record(file, [], [], []), False
        return Record(file, each[0][0], each[0][1], [b for _, b, _ in each]), each[0][2]
    digits, boxes, was_number = _number(entry.get("number", entry.get("label")), entry.get("boxes"))
    return Record(file, digits, boxes), was_number


def _number(raw: object, boxes: object, required: bool = False) -> tuple[list[int], list[list[float]] | None, bool]:
    """A label's digits and digit boxes, checked; and whether the label was a JSON number."""
    was_number = isinstance(raw, int) and not isinstance(raw, bool)
    number = str(raw).strip() if isinstance(raw, (str, int)) and not isinstance(raw, bool) else ""
    if not number.isascii() or not number.isdigit():
        raise ValueError(f"the label must be a string of digits, got {raw!r}"[:160])
    if isinstance(boxes, str):
        boxes = json.loads(boxes) if boxes.strip() else None
    if boxes is None and required:
        raise ValueError("each of numbers needs its digit boxes")
    if boxes is not None:
        if not isinstance(boxes, list) or not all(isinstance(b, list) for b in boxes):
            raise ValueError("boxes must be a list of [left, top, width, height]")
        boxes = [[float(v) for v in box] for box in boxes]
        _check_boxes(boxes, len(number))
    return [int(c) for c in number], boxes, was_number


# --------------------------------------------------------------------------------------------


def find_labels(data: Path, labels: str | None) -> Path:
    """--labels as given, else the first of LABEL_FILES in the data folder."""
    if labels:
        return Path(labels)
    for name in LABEL_FILES:
        if (data / name).is_file():
            return data / name
    raise LabelError(f"{printable(data)}: no labels ({', '.join(LABEL_FILES)}) in this folder; pass --labels FILE")


@dataclass
class LabelledSet:
    """A labelled folder read for use: its labels file, the records that can be used, one error
    line per record that could not be (unreadable, or naming a file outside the folder), one
    line per record with more digits than the network reads, the counts, and warnings."""

    labels: Path
    records: list[Record]
    errors: list[str]
    too_long: list[str]
    left_out: dict[str, int]
    warnings: list[str]


def labelled_set(data: Path, labels: str | None = None) -> LabelledSet:
    """Find the labels of `data`, read them, and keep the records with at most MAX_DIGITS digits."""
    path = find_labels(data, labels)
    records, errors, warnings = read_labels(path)
    outside = [(r, why) for r in records if (why := escapes(data, r.file))]
    escaped = {id(r) for r, _ in outside}
    records = [r for r in records if id(r) not in escaped]
    usable = [r for r in records if len(r.digits) <= MAX_DIGITS]
    too_long = [f"{printable(data / r.file)}: {len(r.digits)} digits, more than {MAX_DIGITS}; left out" for r in records if len(r.digits) > MAX_DIGITS]
    refused = [f"{printable(path)}: entry {printable(r.file)} refused: {why}" for r, why in outside]
    counts = {"unreadable labels": len(errors), "outside the data folder": len(refused), "more than 5 digits": len(too_long)}
    return LabelledSet(path, usable, list(errors) + refused, too_long, counts, warnings)


def escapes(data: Path, file: str) -> str | None:
    """Why a labels entry names a file outside its data folder (None when it does not): a labels
    file is someone else's data, and may name only the images beside it. Symbolic links are
    followed, so a link inside the folder that points out is refused too."""
    if Path(file).is_absolute():
        return f"an absolute path, outside {printable(data)}"
    try:
        inside = (data / file).resolve().is_relative_to(data.resolve())
    except (OSError, RuntimeError, ValueError) as e:  # a link loop, a NUL byte
        return f"cannot be resolved ({one_line(e)})"
    return None if inside else f"resolves outside {printable(data)}"


def read_labels(path: Path) -> tuple[list[Record], list[str], list[str]]:
    """(records, one error line per record left out, warnings)."""
    if path.is_dir():
        raise LabelError(f"{printable(path)}: is a folder, not a labels file; pass the file, or leave --labels out to find {', '.join(LABEL_FILES)} in --data")
    if not path.is_file():
        raise LabelError(f"{printable(path)}: no such labels file")
    return read_digit_struct(path) if path.suffix.lower() == ".mat" else read_labels_file(path)
