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
--json FILE streams every image as it is scored and ends with the report; an interrupted run
leaves a valid document of the images scored so far ("complete": false).
Exit status: 0 done (even when images were left out, which the report counts), 2 usage errors.
"""

import svhn  # noqa: F401  (first: keeps torch_npu from loading itself at `import torch`)

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from model import decode
from svhn import cli, om
from svhn.devices import environment
from svhn.distributed import Ranks, launched
from svhn.images import labelled_crop
from svhn.labels import MAX_DIGITS, LabelError, Record, find_labels, read_labels
from svhn.text import printable


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
        draw.text((x + 6, y + 139), printable(Path(e["file"]).name)[:18], fill=(90, 90, 90))
    try:
        sheet.save(path)
    except (OSError, ValueError) as e:
        cli.die(f"{path}: cannot write the contact sheet ({e})", cli.EXIT_FAILED)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def scored(record: Record, reading) -> dict:
    """One image's result: the truth, the reading (inference.py's fields) and whether it is right."""
    correct = reading.digits == record.target
    return {
        "file": record.file, "true_number": record.number, "true_length": len(record.digits), **reading.as_dict(),
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
        target = [int(c) for c in p["true_number"]] + [10] * (MAX_DIGITS - length)
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
    group.add_argument("--limit", type=cli.positive_int, default=None, help="score only the first N labelled images")
    cli.add_loader_args(group, batch_size=64)
    cli.add_run_args(parser)
    group = parser.add_argument_group("output")
    group.add_argument("--json", metavar="FILE", help="stream every image scored, then the report, to FILE ('-': stdout)")
    group.add_argument("--errors", type=int, default=0, metavar="N", help="list the N most confident misreads")
    group.add_argument("--sheet", metavar="FILE.png", help="contact sheet of the misread crops (with --errors N, or all)")
    group = parser.add_argument_group("an offline model (.om) on Ascend, through ais_bench")
    group.add_argument("--write-bins", metavar="DIR", help="write the crops as ais_bench inputs (batches of --batch-size, the .om's batch) and stop")
    group.add_argument("--om-outputs", metavar="DIR", help="score ais_bench's outputs (--outfmt TXT, NPY or BIN) for those inputs")
    group.add_argument("--bins", metavar="DIR", help="with --om-outputs: the folder --write-bins wrote")
    args = parser.parse_args(argv)
    if args.errors < 0:
        parser.error("--errors must be >= 0")
    return args


def labelled_records(args: argparse.Namespace, data: Path) -> tuple[Path, list[Record], dict[str, int]]:
    """The labels file, the records to score and the counts of those left out (each reported)."""
    try:
        labels = find_labels(data, args.labels)
        records, label_errors, warnings = read_labels(labels)
    except LabelError as e:
        cli.die(str(e))
    for line in label_errors:
        cli.error(line)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    left_out = {"unreadable labels": len(label_errors), "more than 5 digits": 0, "image failed": 0}
    usable = [r for r in records if len(r.digits) <= MAX_DIGITS]
    left_out["more than 5 digits"] = len(records) - len(usable)
    usable = usable[: args.limit] if args.limit else usable
    if not usable:
        cli.die(f"{printable(labels)}: no labelled images to score", cli.EXIT_FAILED)
    return labels, usable, left_out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = Path(args.data)
    if not data.is_dir():
        cli.die(f"{printable(data)}: no such folder")
    # under torchrun each rank scores every world-th image on its own device, and rank 0 writes
    # the same report and JSON as one process would
    ranks = Ranks(args.device) if launched() else None
    if ranks:
        args.device = str(ranks.device)
    main_rank = ranks is None or ranks.main
    labels, usable, left_out = labelled_records(args, data)
    if args.write_bins:
        return write_bins(args, data, labels, usable)
    if args.om_outputs:
        return score_om(args, data, labels, usable, left_out)
    use_boxes = not args.no_boxes
    crop = "boxes" if use_boxes else "whole image"
    out = cli.JsonOutput(args.json, head={"data": data, "labels": labels, "crop": crop}) if args.json and main_rank else None
    run = cli.setup(args, need_model=False)
    if main_rank:
        print(f"scoring {len(usable)} images of {printable(data)} ({labels.name}) on {ranks.world if ranks else 1} x {run.device} {args.dtype}, "
              f"{crop}; {run.header(args.dtype)}", file=sys.stderr)

    share = list(enumerate(usable))[ranks.rank :: ranks.world] if ranks else list(enumerate(usable))
    per_image: list[tuple[int, dict]] = []
    crops: dict[str, np.ndarray] = {}
    failures = cli.Failures()
    start, model_seconds = time.perf_counter(), 0.0

    def load(item: tuple[int, Record]) -> np.ndarray:
        r = item[1]
        return labelled_crop(data / r.file, r.boxes if use_boxes else None)

    with out or contextlib.nullcontext(), tqdm(total=len(share), unit="img", file=sys.stderr, disable=None if main_rank else True) as bar:
        for done, batch in cli.batches(share, load, args, failures):
            t = time.perf_counter()
            readings = run.recognizer.read(batch)
            model_seconds += time.perf_counter() - t
            for (i, r), reading, array in zip(done, readings, as_uint8(batch) if args.sheet else [None] * len(done)):
                per_image.append((i, scored(r, reading)))
                if out and not ranks:
                    out.add(per_image[-1][1])
                if array is not None and not per_image[-1][1]["correct"]:
                    crops[r.file] = array
            bar.n = len(per_image) + failures.count
            bar.refresh()
        if ranks:
            shares = ranks.gather((per_image, failures.count, crops, model_seconds))
            ranks.close()
            if not main_rank:
                return 0
            per_image = sorted(p for share_images, _, _, _ in shares for p in share_images)
            failures.count = sum(s[1] for s in shares)
            crops = {k: v for s in shares for k, v in s[2].items()}
            model_seconds = max(s[3] for s in shares)
            for _, p in per_image if out else []:
                out.add(p)
        per_image = [p for _, p in per_image]
        left_out["image failed"] = failures.count
        report = summary(per_image, left_out, time.perf_counter() - start, model_seconds)
        if out:
            out.finish({"checkpoint": run.checkpoint, "device": run.device, "dtype": args.dtype, "fp32_mode": run.fp32_mode,
                        "settings": run.recognizer.settings, "environment": environment(run.device), "ranks": ranks.world if ranks else 1, **report})
    where = f"device {run.device} ({environment(run.device)['device_name']}), {args.dtype}, fp32 conv {run.fp32_mode['conv']} / matmul {run.fp32_mode['matmul']}; checkpoint {printable(run.checkpoint)}"
    print_report(args, f"{printable(data)} ({labels.name}), {'box crops' if use_boxes else 'whole images'}", where, report, per_image, crops)
    return 0


def print_report(args: argparse.Namespace, title: str, where: str, report: dict, per_image: list[dict], crops: dict[str, np.ndarray]) -> None:
    """The report as Markdown, the most confident misreads, and their contact sheet."""
    print(f"# Accuracy: {title}\n")
    print(f"{where}\n")
    print(markdown(report))
    misread = sorted((p for p in per_image if not p["correct"]), key=lambda p: -p["confidence"])
    if args.errors:
        print(f"\n{min(args.errors, len(misread))} of {len(misread)} misread images, most confident first\n")
        rows = [[printable(p["file"]), p["true_number"], p["number"] or "-", f"{p['confidence']:.3f}"] for p in misread[: args.errors]]
        print(cli.markdown_table(["file", "true", "read", "confidence"], rows))
    if args.sheet and crops is not None:
        shown_errors = misread[: args.errors] if args.errors else misread
        contact_sheet(shown_errors, crops, Path(args.sheet))
        cli.note(f"contact sheet of {len(shown_errors)} misread crops: {printable(args.sheet)}")


# --------------------------------------------------------------------------------------------
# An offline model (.om) on Ascend, through ais_bench
# --------------------------------------------------------------------------------------------


def write_bins(args: argparse.Namespace, data: Path, labels: Path, usable: list[Record]) -> int:
    """The crops as ais_bench inputs, one .bin per batch of --batch-size (the .om's batch)."""
    folder = Path(args.write_bins)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        cli.die(f"{printable(folder)}: cannot write here ({e.strerror})")
    failures, batches = cli.Failures(), []
    for done, batch in cli.batches(usable, lambda r: labelled_crop(data / r.file, None if args.no_boxes else r.boxes), args, failures):
        om.write_batch(folder, len(batches), batch, args.batch_size)
        batches.append([r.file for r in done])
    om.write_index(folder, args.batch_size, batches, {"data": str(data), "labels": str(labels), "crop": "whole image" if args.no_boxes else "boxes"})
    print(f"{sum(map(len, batches))} images in {len(batches)} inputs of batch {args.batch_size} written to {printable(folder)}"
          + (f" ({failures.count} left out)" if failures.count else ""))
    print(f"run them: python3 -m ais_bench --model svhn_bs{args.batch_size}.om --input {printable(folder)} --output om_out --output_dirname run --outfmt TXT")
    print(f"score them: python evaluation/eval_accuracy.py --data {printable(data)} --bins {printable(folder)} --om-outputs om_out/run")
    return 0


def score_om(args: argparse.Namespace, data: Path, labels: Path, usable: list[Record], left_out: dict[str, int]) -> int:
    """The published accuracy of ais_bench's outputs for the inputs write_bins wrote."""
    if not args.bins:
        cli.die("--om-outputs needs --bins DIR, the folder --write-bins wrote")
    outputs, bins = Path(args.om_outputs), Path(args.bins)
    by_file = {r.file: r for r in usable}
    per_image = []
    try:
        index = om.read_index(bins)
        for k, files in enumerate(index["batches"]):
            readings = decode(om.read_outputs(outputs, k, index["batch_size"], len(files)))
            per_image += [scored(by_file[f], reading) for f, reading in zip(files, readings) if f in by_file]
    except om.OmError as e:
        cli.die(str(e), cli.EXIT_FAILED)
    left_out["image failed"] = len(usable) - len(per_image)
    report = summary(per_image, left_out, 0.0, 0.0)
    if args.json:
        with cli.JsonOutput(args.json, head={"data": data, "labels": labels, "crop": index.get("crop"), "om_outputs": outputs}) as out:
            for p in per_image:
                out.add(p)
            out.finish(report)
    print_report(args, f"{printable(data)} ({labels.name}), {index.get('crop')}", f"ais_bench outputs {printable(outputs)}, inputs {printable(bins)}", report, per_image, None)
    return 0


if __name__ == "__main__":
    cli.run(main)
