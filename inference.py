#!/usr/bin/env python3
"""Read house numbers with the published SVHN recognizer on an Ascend NPU, a CUDA GPU or the CPU.

    python inference.py --image photo.jpg more/ 'shots/*.png' --device npu
    python inference.py --compare --device npu            # NPU against the CPU fp32 reference
    python inference.py --onnx svhn.onnx --compare        # the exported file under ONNX Runtime
    cat photo.jpg | python inference.py --image - --json  # '-' reads one image from stdin

One line per image on stdout: `path  number  confidence` (number '-' when nothing was read).
--json instead streams a JSON list, one object per input, as they are read: the reading, or
{"image", "error"} for an input that could not be read. Progress goes to stderr on a terminal
(or past 500 images), never to stdout.
Exit status: 0 all read; 1 an image failed or --compare said FAIL; 2 usage errors; 130 Ctrl-C.
"""

import svhn  # noqa: F401  (first: keeps torch_npu from loading itself at `import torch`)

import argparse
import contextlib
import sys
from dataclasses import asdict
from typing import Iterator

from tqdm import tqdm

from model import decode
from svhn import deviation, exits, flags, output
from svhn.images import Failures, ImageError, expand_inputs, load_ahead, photo_input_noted, to_tensor
from svhn.network import Comparison
from svhn.recognizer import reference
from svhn.setup import setup
from svhn.text import printable, shown

LONG_RUN = 500  # images: past this, progress shows on stderr even when it is not a terminal


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument("--image", nargs="+", metavar="PATH", help="image files, folders, globs, '-' for stdin (default: the bundled examples/)")
    flags.add_loader_args(group, batch_size=16)
    flags.add_run_args(parser)
    group = parser.add_argument_group("output")
    group.add_argument("--json", nargs="?", const="-", metavar="FILE", help="stream a JSON list, one object per image, to FILE (default: stdout)")
    group.add_argument(
        "--compare",
        action="store_true",
        help="also run every batch on the CPU in strict fp32 (the published module, unfolded) and report the "
        "deviation per head with a PASS/FAIL verdict (exit 1 on FAIL)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = inputs_in_order(args.image or [shown(flags.EXAMPLES)])
    out = output.JsonOutput(args.json, items_key="images" if args.compare else None) if args.json else None
    run = setup(flags.run_options(args), need_model=args.compare)
    comparison = Comparison(reference(run.model), run.recognizer) if args.compare else None
    print(run.header(), file=sys.stderr)
    failures = Failures(report=lambda line: None)  # each is reported as its record is written
    report = None
    show = sys.stderr.isatty() or len(paths) >= LONG_RUN
    with out or contextlib.nullcontext(), tqdm(total=len(paths), unit="img", file=sys.stderr, disable=not show) as bar:
        for records in read_batches(paths, args, run, comparison):
            for path, record in records:
                if "error" in record:
                    write_failure(out, path, record["error"], failures, bar)
                elif out:
                    out.add({"image": path, **record})
                else:
                    say(bar, f"{printable(path)}  {record['number'] or '-'}  {record['confidence']:.3f}", sys.stdout)
                if record.get("note"):
                    say(bar, f"note: {printable(path)}: {record['note']}", sys.stderr)
            bar.update(len(records))
        read = len(paths) - failures.count
        if comparison is not None and read:
            report = comparison.report()
            report["target"]["fp32_mode"] = run.fp32_mode
        if out:
            out.finish({"comparison": report} if args.compare else None)
        elif report is not None:
            print(f"\n{run.device} {args.dtype} against the cpu float32 reference, {read} images\n")
            print(deviation.markdown(report))
    if not read and not failures.count:
        exits.error("no images to read")
    if failures.count or not read:
        return exits.EXIT_FAILED
    return exits.EXIT_FAILED if report is not None and report["verdict"] == "FAIL" else 0


def inputs_in_order(specs: list[str]) -> list:
    """The image paths the specs name, in order; a spec that names none (a glob matching nothing,
    a folder without images) stands in its place as the ImageError that says so."""
    found: list = []
    for spec in specs:
        paths, problems = expand_inputs([spec])
        found += paths + [ImageError(line, spec) for line in problems]
    return found


def load_input(item: tuple[int, object]) -> tuple:
    if isinstance(item[1], ImageError):
        raise item[1]
    return photo_input_noted(item[1])


def read_batches(paths: list, args: argparse.Namespace, run, comparison) -> Iterator[list[tuple[object, dict]]]:
    """Per batch, (path, record) in input order: the reading (and a size note), or the error."""
    items = list(enumerate(paths))
    for done, loaded, errors in load_ahead(items, load_input, args.batch_size, args.workers, to_batch=False):
        records = [(i, path, {"error": message}) for (i, path), message in errors]
        if loaded:
            batch = to_tensor([array for array, _ in loaded])
            logits = comparison.add(batch, [printable(p) for _, p in done]) if comparison else run.recognizer.outputs(batch)
            for (i, path), (_, note), reading in zip(done, loaded, decode(logits)):
                records.append((i, path, {**asdict(reading), **({"note": note} if note else {})}))
        yield [(path.spec if isinstance(path, ImageError) else path, record) for _, path, record in sorted(records, key=lambda r: r[0])]


def say(bar: tqdm, line: str, stream) -> None:
    """A line on stdout or stderr that does not break the progress bar (flushed: others read as it comes)."""
    if bar.disable:
        print(line, file=stream, flush=True)
    else:
        bar.write(line, file=stream)
        stream.flush()


def write_failure(out, path, message: str, failures: Failures, bar) -> None:
    failures.add([message])
    say(bar, f"error: {message}", sys.stderr)
    if out and out.items_key is None:
        out.add({"image": path, "error": message})

if __name__ == "__main__":
    exits.run(main)
