#!/usr/bin/env python3
"""Read house numbers with the published SVHN recognizer on an Ascend NPU, a CUDA GPU or the CPU.

    python inference.py --image photo.jpg more/ 'shots/*.png' --device npu
    python inference.py --compare --device npu            # NPU against the CPU fp32 reference

One line per image on stdout: `path  number  confidence` (number '-' when nothing was read).
Exit status: 0 all read; 1 an image failed or --compare said FAIL; 2 usage errors.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import cli
import deviation
from device import environment
from images import expand_inputs, load_ahead, open_image, resize_and_crop
from model import decode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument("--image", nargs="+", metavar="PATH", help="image files, folders and globs (default: the bundled examples/)")
    group.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: %(default)s)")
    group.add_argument("--workers", type=int, default=2, help="threads decoding images ahead (default: %(default)s)")
    cli.add_model_args(parser)
    cli.add_device_args(parser)
    group = parser.add_argument_group("output")
    group.add_argument("--json", action="store_true", help="print a JSON list, one object per image")
    group.add_argument(
        "--compare",
        action="store_true",
        help="also run every batch on the CPU in strict fp32 (the published module, unfolded) and report the "
        "deviation per head with a PASS/FAIL verdict (exit 1 on FAIL)",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def load_input(path) -> np.ndarray:
    return resize_and_crop(open_image(path))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths, problems = expand_inputs(args.image or [cli.shown(cli.EXAMPLES)])
    for line in problems:
        cli.error(line)
    model, checkpoint = cli.load_model_or_exit(args)
    device, dtype, mode = cli.setup_or_exit(args)
    recognizer = cli.recognizer(args, model, device, dtype)
    comparison = deviation.Comparison(model, recognizer) if args.compare else None
    print(
        f"checkpoint {checkpoint} | device {device} ({environment(device)['device_name']}) | {args.dtype} | "
        f"fp32 conv {mode['conv']}, matmul {mode['matmul']} | {recognizer.settings['kernels']}, "
        f"{recognizer.settings['memory_format']}, graph {recognizer.graph}",
        file=sys.stderr,
    )

    failed = len(problems)
    results, names = [], []
    for done, batch, errors in load_ahead(paths, load_input, args.batch_size, args.workers):
        for _, message in errors:
            cli.error(message)
        failed += len(errors)
        if batch is None:
            continue
        logits = comparison.add(batch, done) if comparison else recognizer.logits(batch)
        for path, reading in zip(done, decode(logits)):
            names.append(str(path))
            if args.json:
                results.append({"image": str(path), **reading.as_dict()})
            else:
                print(f"{path}  {reading.number or '-'}  {reading.confidence:.3f}", flush=True)

    report = None
    if comparison is not None and names:
        report = comparison.report()
        report["target"]["fp32_mode"] = mode
    if args.json:
        cli.write_json("-", {"images": results, "comparison": report} if args.compare else results)
    elif report is not None:
        print(f"\n{device} {args.dtype} against the cpu float32 reference, {len(names)} images\n")
        print(deviation.markdown(report))
    if not names and not failed:
        cli.error("no images to read")
    if failed or not names:
        return cli.EXIT_FAILED
    return cli.EXIT_FAILED if report is not None and report["verdict"] == "FAIL" else 0


if __name__ == "__main__":
    cli.run(main)
