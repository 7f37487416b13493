#!/usr/bin/env python3
"""Precision of a device against the CPU fp32 reference, per head, with a verdict.

    python evaluation/eval_precision.py --device npu                       # NPU fp32 (HF32 convs)
    python evaluation/eval_precision.py --device npu --fp32-mode strict    # HF32 off
    python evaluation/eval_precision.py --device cuda --dtype bfloat16 --json results/bf16.json
    python evaluation/eval_precision.py --network localizer --device npu    # the localizer, its boxes too

Reference: the published module (BatchNorm not folded) on the CPU in IEEE fp32. Target: the fast
path on --device in --dtype. Inputs: --samples seeded random images plus every image in --images.
The statistics and rules are deviation.py's, the same as `inference.py --compare`.
Exit status: 0 PASS, 1 FAIL, 2 usage errors.
"""

import svhn  # noqa: F401  (first: keeps torch_npu from loading itself at `import torch`)

import argparse

from svhn import deviation, exits, flags, output
from svhn.devices import environment
from svhn.images import Failures, expand_inputs, photo_input, random_input, readable_batches
from svhn.finder import photo_for_finding
from svhn.network import Comparison, reference as network_reference
from svhn.recognizer import reference
from svhn.setup import setup
from svhn.text import shown


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("inputs")
    group.add_argument("--samples", type=flags.non_negative_int, default=100, help="seeded random images (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="seed of the random images (default: %(default)s)")
    group.add_argument("--images", nargs="*", default=None, help="real images: files, folders, globs (default: examples/)")
    flags.add_loader_args(group, batch_size=16)
    group.add_argument("--network", choices=("recognizer", "localizer"), default="recognizer", help="(default: %(default)s)")
    flags.add_run_args(parser)
    parser.add_argument("--json", metavar="FILE", help="write every figure, the versions and the settings here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths, problems = expand_inputs(args.images if args.images is not None else [shown(flags.EXAMPLES)])
    failures = Failures(problems)
    out = output.JsonOutput(args.json) if args.json else None
    find = args.network == "localizer"
    run = setup(flags.run_options(args), find=find)
    if find:
        comparison = Comparison(network_reference(run.localizer_model, run.localizer.spec), run.localizer)
        load = lambda path: photo_for_finding(path).input  # noqa: E731
    else:
        comparison = Comparison(reference(run.model), run.recognizer)
        load = photo_input
    noise = random_input(args.samples, args.seed, size=comparison.spec.input_size)
    for start in range(0, args.samples, args.batch_size):
        comparison.add(noise[start : start + args.batch_size], [f"random#{i}" for i in range(start, min(start + args.batch_size, args.samples))])
    for done, batch in readable_batches(paths, load, args.batch_size, args.workers, failures):
        comparison.add(batch, [shown(p) for p in done])
    if not comparison.names:
        exits.die("no inputs: --samples is 0 and no image could be read", exits.EXIT_FAILED)

    report = comparison.report()
    real = len(comparison.names) - args.samples
    env = environment(run.device)
    s = (run.localizer if find else run.recognizer).settings
    print(f"# Precision of the {args.network}: {env['device_name']} ({run.device}, {args.dtype}) against CPU fp32\n")
    print(f"inputs: {args.samples} random images (seed {args.seed}) + {real} real images" + (f" ({failures.count} unreadable, left out)" if failures.count else ""))
    source = f"localizer {shown(run.localizer_path)}" if find else f"checkpoint {shown(run.checkpoint)}"
    print(f"reference: cpu float32, IEEE, the module as trained (BatchNorm not folded); {source}")
    print(f"target: {run.header()}; torch {env['torch']}" + (f", torch_npu {env.get('torch_npu')}, CANN {env.get('cann')}" if run.device.type == "npu" else ""))
    print()
    print(deviation.markdown(report))
    if out:
        out.finish(
            {
                "report": report,
                "inputs": {"random": args.samples, "seed": args.seed, "real": real, "unreadable": failures.count},
                "reference": {"device": "cpu", "dtype": "float32", "fp32_mode": "ieee", "module": "published, BatchNorm not folded"},
                "target": {"device": str(run.device), "fp32_mode": run.fp32_mode, **s},
                "checkpoint": str(run.localizer_path if find else run.checkpoint),
                "network": args.network,
                "environment": env,
            }
        )
    return exits.EXIT_FAILED if report["verdict"] == "FAIL" else 0


if __name__ == "__main__":
    exits.run(main)
