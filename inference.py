#!/usr/bin/env python3
"""Read house numbers with the published SVHN recognizer on an Ascend NPU, a CUDA GPU or the CPU.

    python inference.py --image photo.jpg more/ 'shots/*.png' --device npu
    python inference.py --compare --device npu            # NPU against the CPU fp32 reference
    python inference.py --onnx svhn.onnx --compare        # the exported file under ONNX Runtime
    cat photo.jpg | python inference.py --image - --json  # '-' reads one image from stdin

One line per image on stdout: `path  number  confidence` (number '-' when nothing was read).
--json instead streams a JSON list, one object per image, as they are read.
Exit status: 0 all read; 1 an image failed or --compare said FAIL; 2 usage errors; 130 Ctrl-C.
"""

import svhn  # noqa: F401  (first: keeps torch_npu from loading itself at `import torch`)

import argparse
import contextlib
import sys

from model import decode
from svhn import cli, deviation
from svhn.images import expand_inputs, photo_input
from svhn.recognizer import Comparison
from svhn.text import printable, shown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument("--image", nargs="+", metavar="PATH", help="image files, folders, globs, '-' for stdin (default: the bundled examples/)")
    cli.add_loader_args(group, batch_size=16)
    cli.add_run_args(parser)
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
    paths, problems = expand_inputs(args.image or [shown(cli.EXAMPLES)])
    failures = cli.Failures(problems)
    out = cli.JsonOutput(args.json, items_key="images" if args.compare else None) if args.json else None
    run = cli.setup(args, need_model=args.compare)
    comparison = Comparison(run.model, run.recognizer) if args.compare else None
    print(run.header(args.dtype), file=sys.stderr)

    read, report = 0, None
    with out or contextlib.nullcontext():  # an interrupted run still leaves valid JSON
        for done, batch in cli.batches(paths, photo_input, args, failures):
            logits = comparison.add(batch, [printable(p) for p in done]) if comparison else run.recognizer.logits(batch)
            for path, reading in zip(done, decode(logits)):
                read += 1
                if out:
                    out.add({"image": path, **reading.as_dict()})
                else:
                    print(f"{printable(path)}  {reading.number or '-'}  {reading.confidence:.3f}", flush=True)
        if comparison is not None and read:
            report = comparison.report()
            report["target"]["fp32_mode"] = run.fp32_mode
        if out:
            out.finish({"comparison": report} if args.compare else None)
        elif report is not None:
            print(f"\n{run.device} {args.dtype} against the cpu float32 reference, {read} images\n")
            print(deviation.markdown(report))
    if not read and not failures.count:
        cli.error("no images to read")
    if failures.count or not read:
        return cli.EXIT_FAILED
    return cli.EXIT_FAILED if report is not None and report["verdict"] == "FAIL" else 0


if __name__ == "__main__":
    cli.run(main)
