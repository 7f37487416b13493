#!/usr/bin/env python3
"""Check a checkpoint: it loads strictly into the published network, its keys, shapes and
parameter count are right, and one example image goes through a forward pass.

    python test_load.py [--checkpoint PATH] [--device cpu] [--image examples/plaque-503.png]

Prints a short report; exits 0 when everything holds, 1 when something does not, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import cli
from images import ImageError, preprocess
from model import (
    NUM_PARAMETERS,
    CheckpointError,
    Recognizer,
    count_parameters,
    find_checkpoint,
    load_state_dict,
    model_from_state_dict,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser)
    parser.add_argument("--device", default="cpu", help="device for the forward pass (default: %(default)s)")
    parser.add_argument("--image", default=None, help="image for the forward pass (default: the first bundled example)")
    args = parser.parse_args(argv)

    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str = "") -> bool:
        checks.append((name, ok, detail))
        print(f"[{'ok' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)
        return ok

    try:
        path = find_checkpoint(args.checkpoint)
    except CheckpointError as e:
        cli.die(str(e))
    size = path.stat().st_size
    check("checkpoint found", True, f"{path} ({size / 1e6:.1f} MB)")
    try:
        start = time.perf_counter()
        state_dict = load_state_dict(path)
        check("loads with weights_only=True", True, f"{len(state_dict)} entries in {time.perf_counter() - start:.2f} s")
    except CheckpointError as e:
        check("loads with weights_only=True", False, str(e))
        return 1
    try:
        model = model_from_state_dict(state_dict, path)
        check("keys and shapes match the published network", True, f"{len(state_dict)} keys, loaded with strict=True")
    except CheckpointError as e:
        check("keys and shapes match the published network", False, str(e))
        return 1
    n = count_parameters(model)
    check("parameter count", n == NUM_PARAMETERS, f"{n:,} (published: {NUM_PARAMETERS:,})")

    image = Path(args.image) if args.image else next(iter(sorted(cli.EXAMPLES.glob("*.png"))), None)
    if image is None:
        check("forward pass", False, "no example image found; pass --image")
        return 1
    try:
        x = preprocess(image).unsqueeze(0)
    except ImageError as e:
        check("forward pass", False, str(e))
        return 1
    device = cli.device_or_exit(args.device)
    with torch.inference_mode():
        logits = model(x)
    shapes_ok = [tuple(t.shape) for t in logits] == [(1, 7)] + [(1, 11)] * 5
    finite = all(torch.isfinite(t).all() for t in logits)
    reading = Recognizer(model, device).read(x)[0]
    check("forward pass", shapes_ok and finite, f"{image.name} on {device}: '{reading.number}' (confidence {reading.confidence:.3f})")
    failed = [name for name, ok, _ in checks if not ok]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(main)
