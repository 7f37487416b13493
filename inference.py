#!/usr/bin/env python3
"""Read house numbers with the published SVHN recognizer on an Ascend NPU, a CUDA GPU or the CPU.

    python inference.py --image photo.jpg more/ 'shots/*.png' --device npu
    python inference.py --find --image street/ --draw seen/  # find the number first, draw where
    python inference.py --compare --device npu            # NPU against the CPU fp32 reference
    python inference.py --onnx svhn.onnx --compare        # the exported file under ONNX Runtime
    cat photo.jpg | python inference.py --image - --json  # '-' reads one image from stdin
    torchrun --nproc-per-node 8 inference.py --find --image DIR --json out.json --device npu

--find: the localizer (localizer.py) finds the number in the whole photo, the found box is
cropped by the published protocol and the recognizer reads the crop. --whole-image: the
published demo's read of the whole photo (64x64, centre 54x54). See FIND_BY_DEFAULT for which
one runs when neither is given.
One line per image on stdout: `path  number  confidence` (number '-' when nothing was read), and
with --find the box it was read in. --json instead streams a JSON list, one object per input, as
they are read: the reading (with --find also "box" [left, top, width, height] in the photo's
pixels or null, and "find_score"), or {"image", "error"} for an input that could not be read.
Progress goes to stderr on a terminal (or past 500 images), never to stdout. Under torchrun each
rank reads every world-th image and rank 0 writes them all, in input order.
Exit status: 0 all read; 1 an image failed or --compare said FAIL; 2 usage errors; 130 Ctrl-C.
"""

import svhn  # noqa: F401  (first: keeps torch_npu from loading itself at `import torch`)

import argparse
import contextlib
import sys
from dataclasses import asdict
from typing import Iterator

from tqdm import tqdm

from pathlib import Path

import localizer
from model import decode
from svhn import deviation, exits, flags, output
from svhn.distributed import Ranks, launched
from svhn.files import write_bytes_atomic
from svhn.finder import PhotoResult, drawn, find_and_read, photo_for_finding
from svhn.images import Failures, ImageError, expand_inputs, load_ahead, photo_input_noted, to_tensor
from svhn.network import Comparison, reference as network_reference
from svhn.recognizer import reference
from svhn.setup import setup
from svhn.text import printable, shown

LONG_RUN = 500  # images: past this, progress shows on stderr even when it is not a terminal
# Measured on ../shared/data/samples (README, "Reading a whole photo"): finding reads the whole
# photos better, but the already-cropped SVHN samples worse than the published whole-image read,
# so the published read stays the default and finding is asked for.
FIND_BY_DEFAULT = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument("--image", nargs="+", metavar="PATH", help="image files, folders, globs, '-' for stdin (default: the bundled examples/)")
    flags.add_loader_args(group, batch_size=16)
    flags.add_run_args(parser)
    group = parser.add_argument_group("finding the number")
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--find", action="store_true", default=None, help="find the number with the localizer, crop the found box, read it"
                      + (" (the default)" if FIND_BY_DEFAULT else ""))
    mode.add_argument("--whole-image", action="store_true", help="read the whole photo as the published demo does (64x64, centre 54x54)"
                      + ("" if FIND_BY_DEFAULT else " (the default)"))
    group.add_argument("--find-score", type=float, default=localizer.SCORE_THRESHOLD, metavar="S",
                       help="a found box needs at least this score (default: %(default)s)")
    group.add_argument("--draw", metavar="DIR", help="with --find: write each photo with its found boxes and readings drawn, as DIR/<name>.png")
    group = parser.add_argument_group("output")
    group.add_argument("--json", nargs="?", const="-", metavar="FILE", help="stream a JSON list, one object per image, to FILE (default: stdout)")
    group.add_argument(
        "--compare",
        action="store_true",
        help="also run every batch on the CPU in strict fp32 (the published module, unfolded) and report the "
        "deviation per head with a PASS/FAIL verdict (exit 1 on FAIL)",
    )
    args = parser.parse_args(argv)
    args.find = (FIND_BY_DEFAULT and not args.whole_image) if args.find is None else args.find
    if not 0 <= args.find_score <= 1:
        parser.error("--find-score must be between 0 and 1")
    if args.draw and not args.find:
        parser.error("--draw shows the found boxes: it needs --find")
    if args.compare and launched():
        parser.error("--compare runs in one process, not under torchrun")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ranks = Ranks(args.device, exits.note) if launched() else None
    paths = inputs_in_order(args.image or [shown(flags.EXAMPLES)])
    main_rank = ranks is None or ranks.main
    out = output.JsonOutput(args.json, items_key="images" if args.compare else None) if args.json and main_rank else None
    run = setup(flags.run_options(args), need_model=args.compare, device=ranks.device if ranks else None, find=args.find)
    check = Checks(run, args.find) if args.compare else None
    if main_rank:
        print(run.header(), file=sys.stderr)
    if args.draw:
        make_draw_folder(Path(args.draw))
    mine = list(enumerate(paths))[ranks.rank :: ranks.world] if ranks else list(enumerate(paths))
    failures = Failures(report=lambda line: None)  # each is reported as its record is written
    show = main_rank and (sys.stderr.isatty() or len(paths) >= LONG_RUN)
    write = Writer(out, failures)
    with out or contextlib.nullcontext(), tqdm(total=len(mine), unit="img", file=sys.stderr, disable=not show) as bar:
        write.bar = bar
        batches = (find_batches if args.find else read_batches)(mine, args, run, check)
        if ranks:  # every rank reads its share; rank 0 writes them all in input order
            records = sorted(r for share in ranks.gather([r for batch in batches for r in batch]) for r in share)
            ranks.close()
            if not main_rank:
                return 0
            batches = [records]
        for records in batches:
            for _, path, record in records:
                write(path, record)
            bar.update(len(records))
        read = len(paths) - failures.count
        report = check.report(run) if check is not None and read else None
        if out:
            out.finish({"comparison": report} if args.compare else None)
        elif report is not None:
            print(f"\n{run.device} {args.dtype} against the cpu float32 reference, {read} images\n")
            print(check.markdown(report))
    if not read and not failures.count:
        exits.error("no images to read")
    if failures.count or not read:
        return exits.EXIT_FAILED
    return exits.EXIT_FAILED if report is not None and report["verdict"] == "FAIL" else 0


class Writer:
    """Each record as it comes: a line on stdout (or a JSON object), an error line on stderr, and
    any note; counted in `failures` when it is an error."""

    def __init__(self, out, failures: Failures) -> None:
        self.out, self.failures, self.bar = out, failures, None

    def __call__(self, path, record: dict) -> None:
        if "error" in record:
            self.failures.add([record["error"]])
            say(self.bar, f"error: {record['error']}", sys.stderr)
            if self.out and self.out.items_key is None:
                self.out.add({"image": path, "error": record["error"]})
        elif self.out:
            self.out.add({"image": path, **record})
        else:
            at = ""
            if "box" in record:
                at = f"  at {','.join(str(round(v)) for v in record['box'])}  find {record['find_score']:.2f}" if record["box"] else "  (no number found)"
            say(self.bar, f"{printable(path)}  {record['number'] or '-'}  {record['confidence']:.3f}{at}", sys.stdout)
        if record.get("note"):
            say(self.bar, f"note: {printable(path)}: {record['note']}", sys.stderr)


class Checks:
    """--compare: every network that runs against its CPU fp32 reference; with --find also the
    whole reference pipeline (reference localizer, its boxes, reference recognizer), so that the
    final readings can be compared."""

    def __init__(self, run, find: bool) -> None:
        self.recognizer = Comparison(reference(run.model), run.recognizer)
        self.localizer = Comparison(network_reference(run.localizer_model, run.localizer.spec), run.localizer) if find else None
        self.pipeline_ref = []  # (reference reading, target reading) per photo

    def report(self, run) -> dict:
        report = self.recognizer.report()
        report["target"]["fp32_mode"] = run.fp32_mode
        if self.localizer is None:
            return report
        loc = self.localizer.report()
        agree = sum(r == t for r, t in self.pipeline_ref)
        return {"verdict": "FAIL" if "FAIL" in (report["verdict"], loc["verdict"]) else "PASS", "localizer": loc, "recognizer": report,
                "final_readings_agree": agree, "photos": len(self.pipeline_ref),
                "final_readings_differ": [name for (r, t), name in zip(self.pipeline_ref, self.localizer.names) if r != t]}

    def markdown(self, report: dict) -> str:
        if self.localizer is None:
            return deviation.markdown(report)
        return (f"## localizer\n\n{deviation.markdown(report['localizer'])}\n\n## recognizer (on the target's found crops)\n\n"
                f"{deviation.markdown(report['recognizer'])}\n\nfinal readings (find, crop, read) agree with the CPU fp32 pipeline's: "
                f"{report['final_readings_agree']} of {report['photos']} photos\nverdict: {report['verdict']}")


def inputs_in_order(specs: list[str]) -> list:
    """The image paths the specs name, in order; a spec that names none (a glob matching nothing,
    a folder without images) stands in its place as the ImageError that says so."""
    found: list = []
    for spec in specs:
        paths, problems = expand_inputs([spec])
        found += paths + [ImageError(line, spec) for line in problems]
    return found


def load_input(item: tuple[int, object]) -> tuple:
    """The whole-image input of one photo, and its size note."""
    if isinstance(item[1], ImageError):
        raise item[1]
    return photo_input_noted(item[1])


def read_batches(items: list, args: argparse.Namespace, run, check) -> Iterator[list[tuple[int, object, dict]]]:
    """Per batch, (index, path, record) in input order: the whole-image reading (and a size
    note), or the error."""
    for done, loaded, errors in load_ahead(items, load_input, args.batch_size, args.workers, to_batch=False):
        records = [(i, path, {"error": message}) for (i, path), message in errors]
        if loaded:
            batch = to_tensor([array for array, _ in loaded])
            logits = check.recognizer.add(batch, [printable(p) for _, p in done]) if check else run.recognizer.outputs(batch)
            for (i, path), (_, note), reading in zip(done, loaded, decode(logits)):
                records.append((i, path, {**asdict(reading), **({"note": note} if note else {})}))
        yield in_order(records)


def load_photo(item: tuple[int, object]):
    if isinstance(item[1], ImageError):
        raise item[1]
    return photo_for_finding(item[1])


def find_batches(items: list, args: argparse.Namespace, run, check) -> Iterator[list[tuple[int, object, dict]]]:
    """Per batch, (index, path, record) in input order: found, cropped and read (find_and_read),
    or the error. With --compare the reference pipeline runs too, for the final readings."""
    localize = check.localizer.add if check else lambda batch, names: run.localizer.outputs(batch)
    recognize = check.recognizer.add if check else lambda batch, names: run.recognizer.outputs(batch)
    for done, photos, errors in load_ahead(items, load_photo, args.batch_size, args.workers, to_batch=False):
        records = [(i, path, {"error": message}) for (i, path), message in errors]
        names = [printable(p) for _, p in done]
        results = find_and_read(photos, names, localize, recognize, args.find_score)
        if check:
            # the reference localizer already ran on this batch inside the comparison: go on from its outputs
            ref = find_and_read(photos, names, lambda b, n: check.localizer.latest_reference, lambda b, n: check.recognizer.reference.outputs(b),
                                args.find_score)
            check.pipeline_ref += [(numbers_of(r), numbers_of(t)) for r, t in zip(ref, results)]
        for (i, path), photo, result in zip(done, photos, results):
            records.append((i, path, found_record(result, photo.note)))
            if args.draw:
                write_drawing(Path(args.draw), i, path, drawn(photo, result))
        yield in_order(records)


def numbers_of(result: PhotoResult) -> str:
    return ",".join(f.reading.number for f in result.found) or "-"


def found_record(result: PhotoResult, note: str | None) -> dict:
    """A photo's JSON record: the best found number's reading, its box and score, the others."""
    notes = [note] if note else []
    best = result.best
    if best is None:
        notes.append("no house number found")
        record = {"number": "", "length": 0, "digits": [], "confidence": 0.0, "blank_dropped": False, "length_over_5": False,
                  "box": None, "find_score": None, "found": 0}
    else:
        record = {**asdict(best.reading), "box": best.box, "find_score": best.score, "found": len(result.found)}
        if len(result.found) > 1:
            record["others"] = [{"number": f.reading.number, "confidence": f.reading.confidence, "box": f.box, "find_score": f.score} for f in result.found[1:]]
    return {**record, **({"note": "; ".join(notes)} if notes else {})}


def in_order(records: list[tuple[int, object, dict]]) -> list[tuple[int, object, dict]]:
    return [(i, path.spec if isinstance(path, ImageError) else path, record) for i, path, record in sorted(records, key=lambda r: r[0])]


def make_draw_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output.OutputError(f"{printable(folder)}: cannot write the drawings here ({e.strerror or e})") from None


def write_drawing(folder: Path, index: int, path, png: bytes) -> None:
    """DIR/<name>.png, numbered by input position (<index>-<name>.png) so that photos of the same
    name from different folders do not overwrite each other."""
    name = "stdin" if str(path) == "-" else Path(str(path)).stem
    try:
        write_bytes_atomic(folder / f"{index:05d}-{name}.png", png)
    except OSError as e:
        raise output.OutputError(f"{printable(folder)}: cannot write the drawing of {printable(path)} ({e.strerror or e})") from None


def say(bar: tqdm, line: str, stream) -> None:
    """A line on stdout or stderr that does not break the progress bar (flushed: others read as it comes)."""
    if bar.disable:
        print(line, file=stream, flush=True)
    else:
        bar.write(line, file=stream)
        stream.flush()


if __name__ == "__main__":
    exits.run(main)
