#!/usr/bin/env python3
"""Precision of a device against the CPU fp32 reference, per head, with a verdict.

    python evaluation/eval_precision.py --device npu                       # NPU fp32 (HF32 convs)
    python evaluation/eval_precision.py --device npu --fp32-mode strict    # HF32 off
    python evaluation/eval_precision.py --device cuda --dtype bfloat16 --json results/bf16.json

Reference: the published module (BatchNorm not folded) on the CPU in IEEE fp32. Target: the fast
path on --device in --dtype. Inputs: --samples seeded random images plus every image in --images.
The statistics and rules are deviation.py's, the same as `inference.py --compare`.
Exit status: 0 PASS, 1 FAIL, 2 usage errors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import cli  # noqa: E402
import deviation  # noqa: E402
from device import environment  # noqa: E402
from images import expand_inputs, load_ahead, open_image, resize_and_crop, to_tensor  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("inputs")
    group.add_argument("--samples", type=int, default=100, help="seeded random images (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="seed of the random images (default: %(default)s)")
    group.add_argument("--images", nargs="*", default=None, help="real images: files, folders, globs (default: examples/)")
    group.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    cli.add_model_args(parser)
    cli.add_device_args(parser)
    parser.add_argument("--json", metavar="FILE", help="write every figure, the versions and the settings here")
    args = parser.parse_args(argv)
    if args.samples < 0 or args.batch_size < 1:
        parser.error("--samples must be >= 0 and --batch-size >= 1")
    return args


def random_images(n: int, seed: int) -> torch.Tensor:
    """n uint8 54 x 54 RGB images of uniform noise, reproducible from the seed, as network input."""
    g = torch.Generator().manual_seed(seed)
    return to_tensor(torch.randint(0, 256, (n, 54, 54, 3), generator=g, dtype=torch.uint8).numpy())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths, problems = expand_inputs(args.images if args.images is not None else [cli.shown(cli.EXAMPLES)])
    for line in problems:
        cli.error(line)
    model, checkpoint = cli.load_model_or_exit(args)
    device, dtype, mode = cli.setup_or_exit(args)
    target = cli.recognizer(args, model, device, dtype)
    comparison = deviation.Comparison(model, target)

    noise = random_images(args.samples, args.seed)
    for start in range(0, args.samples, args.batch_size):
        comparison.add(noise[start : start + args.batch_size], [f"random#{i}" for i in range(start, min(start + args.batch_size, args.samples))])
    failed = 0
    for done, batch, errors in load_ahead(paths, lambda p: resize_and_crop(open_image(p)), args.batch_size):
        for _, message in errors:
            cli.error(message)
        failed += len(errors)
        if batch is not None:
            comparison.add(batch, [cli.shown(Path(p)) for p in done])
    if not comparison.names:
        cli.die("no inputs: --samples is 0 and no image could be read", cli.EXIT_FAILED)

    report = comparison.report()
    real = len(comparison.names) - args.samples
    env = environment(device)
    print(f"# Precision: {env['device_name']} ({device}, {args.dtype}) against CPU fp32\n")
    print(
        f"inputs: {args.samples} random images (seed {args.seed}) + {real} real images"
        + (f" ({failed} unreadable, left out)" if failed else "")
    )
    print(f"reference: cpu float32, IEEE, published module (BatchNorm not folded); checkpoint {checkpoint}")
    print(
        f"target: {device} {args.dtype}, fp32 conv {mode['conv']} / matmul {mode['matmul']}, "
        f"{target.settings['kernels']}, {target.settings['memory_format']}, graph {target.graph}; "
        f"torch {env['torch']}" + (f", torch_npu {env.get('torch_npu')}, CANN {env.get('cann')}" if device.type == "npu" else "")
    )
    print()
    print(deviation.markdown(report))
    if args.json:
        cli.write_json(
            args.json,
            {
                "report": report,
                "inputs": {"random": args.samples, "seed": args.seed, "real": real, "unreadable": failed},
                "reference": {"device": "cpu", "dtype": "float32", "fp32_mode": "ieee", "module": "published, BatchNorm not folded"},
                "target": {"device": str(device), "fp32_mode": mode, **target.settings},
                "checkpoint": str(checkpoint),
                "environment": env,
            },
        )
    return cli.EXIT_FAILED if report["verdict"] == "FAIL" else 0


if __name__ == "__main__":
    cli.run(main)
