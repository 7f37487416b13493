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
Exit status: 0 every labelled image scored; 1 done, but some records or images were left out (the
report counts them, and each was named on stderr); 2 usage errors.
"""

import svhn  # noqa: F401  (first: keeps torch_npu from loading itself at `import torch`)

import argparse
import contextlib
import io
import sys
import textwrap
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

import localizer
from model import SPEC, Reading, decode
from svhn import exits, flags, om, output
from svhn.devices import environment
from svhn.distributed import Ranks, launched
from svhn.files import write_bytes_atomic
from svhn.boxes import box_iou
from svhn.finder import Photo, PhotoResult, find_and_read, photo_for_finding
from svhn.images import Failures, labelled_crop, load_ahead, readable_batches, resize_and_crop, to_tensor
from svhn.labels import Record, labelled_set
from svhn.scoring import scored, summary
from svhn.setup import setup
from svhn.text import printable

NAME_WIDTH = 18  # characters of Pillow's default font that fit in a sheet cell


def contact_sheet(errors: list[dict], crops: dict[str, np.ndarray], path: Path, columns: int = 8) -> None:
    """Each misread crop at 2x with its true and read number beneath, and its file name wrapped
    onto as many lines as the longest name needs (never cut)."""
    names = [textwrap.wrap(printable(Path(e["file"]).name), NAME_WIDTH, break_long_words=True) or [""] for e in errors]
    lines = max((len(n) for n in names), default=1)
    cell_w, cell_h, scale = 120, 139 + 12 * lines, 2
    columns = max(1, min(columns, len(errors)))
    rows = max(1, (len(errors) + columns - 1) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (e, name) in enumerate(zip(errors, names)):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        crop = Image.fromarray(crops[e["file"]]).resize((54 * scale, 54 * scale), Image.NEAREST)
        sheet.paste(crop, (x + 6, y + 4))
        draw.text((x + 6, y + 114), f"true {e['true_number']}", fill=(0, 110, 0))
        draw.text((x + 6, y + 127), f"read {e['number'] or '-'} {e['confidence']:.2f}", fill=(190, 0, 0))
        for k, part in enumerate(name):
            draw.text((x + 6, y + 139 + 12 * k), part, fill=(90, 90, 90))
    try:
        png = io.BytesIO()
        sheet.save(png, format="PNG")
        write_bytes_atomic(path, png.getvalue())
    except (OSError, ValueError) as e:
        exits.die(f"{path}: cannot write the contact sheet ({e})", exits.EXIT_FAILED)


def markdown(report: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    out = [
        output.markdown_table(
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
        output.markdown_table(
            ["true length", "images", "accuracy"],
            [[k, v["images"], pct(v["accuracy"])] for k, v in report["accuracy_by_length"].items()],
        ),
        "",
        output.markdown_table(
            ["position", "digit accuracy (10 past the end)", "images with a digit there"],
            [[p["position"], pct(p["accuracy"]), p["images_with_a_digit"]] for p in report["digit_accuracy_by_position"]],
        ),
        "",
        "length confusion (rows: true length, columns: read length)",
        "",
        output.markdown_table(
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
    group.add_argument("--find", action="store_true", help="find the number with the localizer and read the found box; the report sets it beside "
                       "the true boxes, the whole image and (where installed) RapidOCR, and scores the found boxes against the true ones")
    group.add_argument("--find-score", type=float, default=localizer.SCORE_THRESHOLD, metavar="S", help="with --find: a found box needs this score (default: %(default)s)")
    group.add_argument("--no-rapidocr", action="store_true", help="with --find: leave RapidOCR's row out even where rapidocr-onnxruntime is installed")
    group.add_argument("--limit", type=flags.positive_int, default=None, help="score only the first N labelled images")
    flags.add_loader_args(group, batch_size=64)
    flags.add_run_args(parser)
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
    if args.find and (args.no_boxes or args.write_bins or args.om_outputs):
        parser.error("--find reads the boxes it finds: not with --no-boxes, --write-bins or --om-outputs")
    return args


def labelled_records(args: argparse.Namespace, data: Path) -> tuple[Path, list[Record], dict[str, int]]:
    """The labels file, the records to score and the counts of those left out (each reported)."""
    found = labelled_set(data, args.labels)
    for line in found.errors:
        exits.error(line)
    for line in found.warnings:
        print(f"warning: {line}", file=sys.stderr)
    usable = found.records[: args.limit] if args.limit else found.records
    if not usable:
        exits.die(f"{printable(found.labels)}: no labelled images to score", exits.EXIT_FAILED)
    return found.labels, usable, {**found.left_out, "image failed": 0}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = Path(args.data)
    if not data.is_dir():
        exits.die(f"{printable(data)}: no such folder")
    # under torchrun each rank scores every world-th image on its own device, and rank 0 writes
    # the same report and JSON as one process would
    ranks = Ranks(args.device, exits.note) if launched() else None
    main_rank = ranks is None or ranks.main
    labels, usable, left_out = labelled_records(args, data)
    if args.write_bins:
        return write_bins(args, data, labels, usable)
    if args.om_outputs:
        return score_om(args, data, labels, usable, left_out)
    crop = "found boxes" if args.find else "whole image" if args.no_boxes else "boxes"
    out = output.JsonOutput(args.json, head={"data": data, "labels": labels, "crop": crop}) if args.json and main_rank else None
    run = setup(flags.run_options(args), need_model=False, device=ranks.device if ranks else None, find=args.find)
    ocr = rapidocr(args) if args.find else None
    if main_rank:
        print(f"scoring {len(usable)} images of {printable(data)} ({labels.name}) on {ranks.world if ranks else 1} x {run.device}, "
              f"{crop}; {run.header()}", file=sys.stderr)
    start = time.perf_counter()
    with out or contextlib.nullcontext():
        share = list(enumerate(usable))[ranks.rank :: ranks.world] if ranks else list(enumerate(usable))
        score = partial(score_found, ocr=ocr) if args.find else score_images
        result = score(args, data, share, run, out if not ranks else None, main_rank)
        if ranks:
            result = merge_ranks(ranks, result)
            if not main_rank:
                return 0
            for _, p in result.per_image if out else []:
                out.add(p)
        per_image = [p for _, p in result.per_image]
        left_out["image failed"] = result.failed
        report = summary(per_image, left_out, time.perf_counter() - start, result.model_seconds)
        if args.find:
            report["rows"] = side_by_side(per_image)
            report["localizer"] = localizer_figures(per_image, run, args.find_score)
        if out:
            out.finish({"checkpoint": run.checkpoint, "device": run.device, "dtype": args.dtype, "fp32_mode": run.fp32_mode,
                        "settings": run.recognizer.settings, "environment": environment(run.device), "ranks": ranks.world if ranks else 1, **report})
    where = f"device {run.device} ({environment(run.device)['device_name']}), {args.dtype}, fp32 conv {run.fp32_mode['conv']} / matmul {run.fp32_mode['matmul']}; checkpoint {printable(run.checkpoint)}"
    if args.find:
        where += f"; localizer {printable(run.localizer_path)} ({run.localizer_model.arch_name})"
    print_report(args, f"{printable(data)} ({labels.name}), {'found boxes' if args.find else 'whole images' if args.no_boxes else 'box crops'}",
                 where, report, per_image, result.crops)
    return exit_status(left_out)


def exit_status(left_out: dict[str, int]) -> int:
    """1 when any record or image was left out (the report says which), as inference.py does."""
    return exits.EXIT_FAILED if any(left_out.values()) else 0


@dataclass
class Scores:
    per_image: list[tuple[int, dict]] = field(default_factory=list)  # (index in the labels, result)
    crops: dict[str, np.ndarray] = field(default_factory=dict)  # misread crops, for the sheet
    failed: int = 0
    model_seconds: float = 0.0


def score_images(args: argparse.Namespace, data: Path, share: list[tuple[int, Record]], run, out, show_progress: bool) -> Scores:
    """Read and score this process's share of the images; each is streamed to `out` if given."""
    result, failures = Scores(), Failures()

    def load(item: tuple[int, Record]) -> np.ndarray:
        r = item[1]
        return labelled_crop(data / r.file, None if args.no_boxes else r.boxes)

    with tqdm(total=len(share), unit="img", file=sys.stderr, disable=None if show_progress else True) as bar:
        for done, arrays, errors in load_ahead(share, load, args.batch_size, args.workers, to_batch=False):
            failures.add(message for _, message in errors)
            if arrays:
                t = time.perf_counter()
                readings = decode(run.recognizer.outputs(to_tensor(arrays)))
                result.model_seconds += time.perf_counter() - t
                for (i, r), reading, array in zip(done, readings, arrays):
                    result.per_image.append((i, scored(r, reading)))
                    if out:
                        out.add(result.per_image[-1][1])
                    if args.sheet and not result.per_image[-1][1]["correct"]:
                        result.crops[r.file] = array
            bar.update(len(done) + len(errors))
    result.failed = failures.count
    return result


def merge_ranks(ranks: Ranks, mine: Scores) -> Scores:
    """Every rank's scores, in the labels' order, on rank 0 (the others get theirs back)."""
    shares = ranks.gather(mine)
    ranks.close()
    if not ranks.main:
        return mine
    return Scores(sorted(p for s in shares for p in s.per_image), {k: v for s in shares for k, v in s.crops.items()},
                  sum(s.failed for s in shares), max(s.model_seconds for s in shares))


def print_report(args: argparse.Namespace, title: str, where: str, report: dict, per_image: list[dict], crops: dict[str, np.ndarray]) -> None:
    """The report as Markdown, the most confident misreads, and their contact sheet."""
    print(f"# Accuracy: {title}\n")
    print(f"{where}\n")
    if "rows" in report:
        print(find_markdown(report) + "\n")
    print(markdown(report))
    misread = sorted((p for p in per_image if not p["correct"]), key=lambda p: -p["confidence"])
    if args.errors:
        print(f"\n{min(args.errors, len(misread))} of {len(misread)} misread images, most confident first\n")
        rows = [[printable(p["file"]), p["true_number"], p["number"] or "-", f"{p['confidence']:.3f}"] for p in misread[: args.errors]]
        print(output.markdown_table(["file", "true", "read", "confidence"], rows))
    if args.sheet and crops is not None:
        shown_errors = misread[: args.errors] if args.errors else misread
        contact_sheet(shown_errors, crops, Path(args.sheet))
        exits.note(f"contact sheet of {len(shown_errors)} misread crops: {printable(args.sheet)}")


# --------------------------------------------------------------------------------------------
# Finding the number first (--find)
# --------------------------------------------------------------------------------------------

ROWS = ("true boxes", "found boxes", "whole image", "RapidOCR")


@dataclass
class FindInputs:
    photo: Photo  # for the localizer, and the image the found box is cropped from
    true_crop: np.ndarray | None  # the published crop from the true digit boxes
    whole: np.ndarray  # the whole image as inference.py --whole-image reads it


def rapidocr(args: argparse.Namespace):
    """RapidOCR's engine (PP-OCRv4 detection and recognition) where rapidocr-onnxruntime is
    installed and not --no-rapidocr; else None (its row is left out, and the report says why)."""
    if args.no_rapidocr:
        return None
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError:
        exits.note("RapidOCR's row is left out: pip install -r requirements-eval.txt (rapidocr-onnxruntime) to add it")
        return None
    return RapidOCR()


def ocr_number(engine, image: Image.Image) -> tuple[str, float]:
    """The digits of RapidOCR's recognised text, its text boxes taken left to right, and the
    lowest score among the texts that gave digits."""
    found, _ = engine(np.asarray(image)[:, :, ::-1].copy())  # RapidOCR takes OpenCV's BGR
    texts = sorted(found or [], key=lambda t: min(p[0] for p in t[0]))
    digits = [(("".join(c for c in t[1] if c.isascii() and c.isdigit())), float(t[2])) for t in texts]
    used = [(d, score) for d, score in digits if d]
    return "".join(d for d, _ in used), min((score for _, score in used), default=0.0)


def score_found(args: argparse.Namespace, data: Path, share: list[tuple[int, Record]], run, out, show_progress: bool, ocr=None) -> Scores:
    """Find, crop and read this process's share of the images, and beside it read the true-box
    crop, the whole image and RapidOCR's text; each image's record carries every row."""
    result, failures = Scores(), Failures()

    def load(item: tuple[int, Record]) -> FindInputs:
        r = item[1]
        photo = photo_for_finding(data / r.file)
        true_crop = labelled_crop(data / r.file, r.boxes) if r.boxes else None
        return FindInputs(photo, true_crop, resize_and_crop(photo.image))

    with tqdm(total=len(share), unit="img", file=sys.stderr, disable=None if show_progress else True) as bar:
        for done, inputs, errors in load_ahead(share, load, args.batch_size, args.workers, to_batch=False):
            failures.add(message for _, message in errors)
            if inputs:
                t = time.perf_counter()
                found = find_and_read([x.photo for x in inputs], [r.file for _, r in done], lambda b, n: run.localizer.outputs(b),
                                      lambda b, n: run.recognizer.outputs(b), args.find_score, every=False)
                result.model_seconds += time.perf_counter() - t
                true = decode(run.recognizer.outputs(to_tensor([x.true_crop for x in inputs if x.true_crop is not None]))) if any(
                    x.true_crop is not None for x in inputs) else []
                whole = decode(run.recognizer.outputs(to_tensor([x.whole for x in inputs])))
                true_readings = iter(true)
                for (i, r), x, f, w in zip(done, inputs, found, whole):
                    rows = {"whole image": w, "found boxes": f.best.reading if f.best else NOTHING}
                    if x.true_crop is not None:
                        rows["true boxes"] = next(true_readings)
                    record = {**scored(r, rows["found boxes"]), **found_fields(r, f, x.photo)}
                    record["rows"] = {name: {"number": rd.number, "correct": scored(r, rd)["correct"]} for name, rd in rows.items()}
                    if ocr is not None:
                        number, confidence = ocr_number(ocr, x.photo.image)
                        record["rows"]["RapidOCR"] = {"number": number, "confidence": confidence, "correct": number == r.number}
                    result.per_image.append((i, record))
                    if out:
                        out.add(record)
                    if args.sheet and not record["correct"]:
                        result.crops[r.file] = f.best.crop if f.best else x.whole
            bar.update(len(done) + len(errors))
    result.failed = failures.count
    return result


NOTHING = Reading(number="", length=0, digits=[10] * 5, confidence=0.0, blank_dropped=False, length_over_5=False)


def found_fields(record: Record, result: PhotoResult, photo: Photo) -> dict:
    """The found box, its score, the true number box and their IoU (the best over the true
    numbers, where the labels give several)."""
    truth = record.number_boxes or []
    best = result.best
    overlap = max((box_iou(best.box, t) for t in truth), default=0.0) if best else 0.0
    return {"box": best.box if best else None, "find_score": best.score if best else None, "found": len(result.found),
            "true_box": truth[0] if truth else None, "iou": overlap if truth else None}


def side_by_side(per_image: list[dict]) -> list[dict]:
    """Each way of reading, on the same images: images it read, accuracy, and the share of the
    true-box accuracy it keeps."""
    rows = []
    for name in ROWS:
        got = [p["rows"][name]["correct"] for p in per_image if name in p["rows"]]
        if got:
            rows.append({"row": name, "images": len(got), "accuracy": sum(got) / len(got)})
    true = next((r["accuracy"] for r in rows if r["row"] == "true boxes"), None)
    for r in rows:
        r["of_true_boxes"] = r["accuracy"] / true if true else None
    return rows


def localizer_figures(per_image: list[dict], run, threshold: float) -> dict:
    """The found boxes against the true number boxes, over the images whose labels give boxes."""
    boxed = [p for p in per_image if p["iou"] is not None]
    n = len(boxed)
    ious = [p["iou"] for p in boxed]
    return {"images_with_true_boxes": n, "mean_iou": sum(ious) / n if n else None,
            "iou_at_least_0.5": sum(v >= 0.5 for v in ious) / n if n else None, "iou_at_least_0.7": sum(v >= 0.7 for v in ious) / n if n else None,
            "nothing_found": sum(p["found"] == 0 for p in per_image), "several_found": sum(p["found"] > 1 for p in per_image),
            "checkpoint": run.localizer_path, "arch": run.localizer_model.arch_name, "score_threshold": threshold}


def find_markdown(report: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    loc = report["localizer"]
    table = output.markdown_table(["read from", "images", "whole-number accuracy", "of the true-box accuracy"],
                                  [[r["row"], r["images"], pct(r["accuracy"]), "-" if r["of_true_boxes"] is None else f"{r['of_true_boxes']:.3f}"]
                                   for r in report["rows"]])
    figures = output.markdown_table(["localizer", "value"], [
        ["images with true boxes", loc["images_with_true_boxes"]], ["mean IoU", "-" if loc["mean_iou"] is None else f"{loc['mean_iou']:.3f}"],
        ["IoU >= 0.5", pct(loc["iou_at_least_0.5"])], ["IoU >= 0.7", pct(loc["iou_at_least_0.7"])],
        ["nothing found", loc["nothing_found"]], ["more than one found", loc["several_found"]]])
    return f"{table}\n\n{figures}"


# --------------------------------------------------------------------------------------------
# An offline model (.om) on Ascend, through ais_bench
# --------------------------------------------------------------------------------------------


def write_bins(args: argparse.Namespace, data: Path, labels: Path, usable: list[Record]) -> int:
    """The crops as ais_bench inputs, one .bin per batch of --batch-size (the .om's batch)."""
    folder = Path(args.write_bins)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        exits.die(f"{printable(folder)}: cannot write here ({e.strerror})")
    failures, batches = Failures(), []
    load = lambda r: labelled_crop(data / r.file, None if args.no_boxes else r.boxes)  # noqa: E731
    for done, batch in readable_batches(usable, load, args.batch_size, args.workers, failures):
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
        exits.die("--om-outputs needs --bins DIR, the folder --write-bins wrote")
    outputs, bins = Path(args.om_outputs), Path(args.bins)
    by_file = {r.file: r for r in usable}
    per_image = []
    index = om.read_index(bins)
    for k, files in enumerate(index["batches"]):
        readings = decode(om.read_outputs(outputs, k, index["batch_size"], len(files), SPEC))
        per_image += [scored(by_file[f], reading) for f, reading in zip(files, readings) if f in by_file]
    left_out["image failed"] = len(usable) - len(per_image)
    report = summary(per_image, left_out, 0.0, 0.0)
    if args.json:
        with output.JsonOutput(args.json, head={"data": data, "labels": labels, "crop": index.get("crop"), "om_outputs": outputs}) as out:
            for p in per_image:
                out.add(p)
            out.finish(report)
    print_report(args, f"{printable(data)} ({labels.name}), {index.get('crop')}", f"ais_bench outputs {printable(outputs)}, inputs {printable(bins)}", report, per_image, None)
    return exit_status(left_out)


if __name__ == "__main__":
    exits.run(main)
