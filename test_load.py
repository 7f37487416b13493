#!/usr/bin/env python3
"""Check a checkpoint: it loads with weights_only=True, its keys, shapes and dtypes are the
published network's, a forward pass on the CPU gives finite logits of the right shapes, and the
device's own output (fast path, --dtype) agrees with the CPU fp32 reference on that image.
--network localizer checks a localizer checkpoint the same way (its format and architecture,
its heatmap and box map, and the boxes it finds on the device against the CPU's).

    python test_load.py [--checkpoint PATH] [--device npu] [--dtype float16] [--image examples/plaque-503.png]
    python test_load.py --network localizer [--localizer PATH] [--device npu]

Prints one line per check; exits 0 when every check holds, 1 when one does not, 2 on usage
errors (no checkpoint found, no such device).
"""

import svhn  # noqa: F401  (first: keeps torch_npu from loading itself at `import torch`)

import argparse
import time
from pathlib import Path

import torch

import localizer
from localizer import LocalizerWeightsError
from model import HEAD_CLASSES, NUM_PARAMETERS, SPEC, WeightsError, count_parameters, decode, model_from_state_dict
from svhn import deviation, devices, exits, flags
from svhn.checkpoints import CheckpointError, find_checkpoint, find_localizer, load_state_dict, read_checkpoint
from svhn.finder import photo_for_finding
from svhn.flags import RunOptions
from svhn.images import ImageError, preprocess, to_tensor
from svhn.network import reference as network_reference
from svhn.recognizer import Recognizer, reference
from svhn.setup import localizer_net, resolve_device
from svhn.text import printable


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.count = 0

    def __call__(self, name: str, ok: bool, detail: str = "") -> bool:
        self.count += 1
        if not ok:
            self.failed.append(name)
        print(f"[{'ok' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)
        return ok

    def summary(self) -> int:
        print(f"{self.count - len(self.failed)}/{self.count} checks passed" + (f"; failed: {', '.join(self.failed)}" if self.failed else ""))
        return exits.EXIT_FAILED if self.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_model_args(parser)
    parser.add_argument("--device", default="cpu", help="device whose output is checked against the CPU reference (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=list(devices.DTYPES), help="dtype on that device (default: %(default)s)")
    parser.add_argument("--image", default=None, help="image for the forward pass (default: the first bundled example)")
    parser.add_argument("--network", choices=("recognizer", "localizer"), default="recognizer", help="which checkpoint to check (default: %(default)s)")
    args = parser.parse_args(argv)
    check = Checks()
    image = Path(args.image) if args.image else next(iter(sorted(flags.EXAMPLES.glob("*.png"))), None)
    if args.network == "localizer":
        check_localizer(args, image, check)
        return check.summary()

    path = find_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    print(f"checkpoint {printable(path)} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)
    try:
        start = time.perf_counter()
        state_dict = load_state_dict(path)
    except CheckpointError as e:
        check("loads with weights_only=True", False, str(e))
        return check.summary()
    check("loads with weights_only=True", True, f"{len(state_dict)} entries in {time.perf_counter() - start:.2f} s")
    try:
        model = model_from_state_dict(state_dict, printable(path))
    except WeightsError as e:
        check("keys, shapes and dtypes are the published network's", False, str(e))
        return check.summary()
    n = count_parameters(model)
    check("keys, shapes and dtypes are the published network's", n == NUM_PARAMETERS, f"{len(state_dict)} keys, strict load, {n:,} parameters (published: {NUM_PARAMETERS:,})")

    try:
        if image is None:
            raise ImageError("no example image found; pass --image")
        x = preprocess(image).unsqueeze(0)
    except ImageError as e:
        check("forward pass on the CPU", False, str(e))
        return check.summary()
    want = reference(model).outputs(x)
    shapes = [tuple(t.shape) for t in want]
    finite = all(bool(torch.isfinite(t).all()) for t in want)
    check(
        "forward pass on the CPU",
        shapes == [(1, c) for c in HEAD_CLASSES] and finite,
        f"{image.name}: '{decode(want)[0].number}', head shapes {shapes}" + ("" if finite else ", NaN or Inf in the logits"),
    )
    target = Recognizer(model, device, devices.DTYPES[args.dtype], note=exits.note)
    got = target.outputs(x)
    report = deviation.compare(want, got, SPEC, target.dtype, [image.name])
    failed = deviation.failed_summary(report)
    check(
        f"{device} {args.dtype} output matches the CPU fp32 reference",
        report["verdict"] == "PASS",
        f"'{decode(got)[0].number}' (confidence {decode(got)[0].confidence:.3f}), max abs {report['max_abs']:.2e}, "
        f"{target.settings['kernels']}" + (f"; {failed}" if failed else ""),
    )
    return check.summary()


def check_localizer(args: argparse.Namespace, image: Path | None, check: Checks) -> None:
    path = find_localizer(args.localizer)
    device = resolve_device(args.device)
    print(f"localizer {printable(path)} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)
    try:
        start = time.perf_counter()
        obj = read_checkpoint(path)
    except CheckpointError as e:
        check("loads with weights_only=True", False, str(e))
        return
    check("loads with weights_only=True", True, f"in {time.perf_counter() - start:.2f} s")
    try:
        model = localizer.from_checkpoint(obj, printable(path))
    except LocalizerWeightsError as e:
        check("format, architecture, keys and shapes are a localizer's", False, str(e))
        return
    spec = localizer.spec(model.arch_name)
    check("format, architecture, keys and shapes are a localizer's", True,
          f"{model.arch_name}, {count_parameters(model):,} parameters, {localizer.flops_per_image(model.arch_name) / 1e9:.3f} GFLOP per image")
    try:
        if image is None:
            raise ImageError("no example image found; pass --image")
        x = to_tensor([photo_for_finding(image).input])
    except ImageError as e:
        check("forward pass on the CPU", False, str(e))
        return
    want = network_reference(model, spec).outputs(x)
    shapes = [tuple(t.shape[1:]) for t in want]
    finite = all(bool(torch.isfinite(t).all()) for t in want)
    check("forward pass on the CPU", shapes == [s for _, s in spec.outputs] and finite,
          f"{image.name}: best box {spec.readings(want)[0]}, output shapes {shapes}" + ("" if finite else ", NaN or Inf in the outputs"))
    target = localizer_net(RunOptions(dtype=args.dtype), model, device)
    got = target.outputs(x)
    report = deviation.compare(want, got, spec, target.dtype, [image.name])
    failed = deviation.failed_summary(report)
    check(f"{device} {args.dtype} output matches the CPU fp32 reference", report["verdict"] == "PASS",
          f"best box {spec.readings(got)[0]}, IoU with the CPU's {report['box_iou_min']:.4f}, max abs {report['max_abs']:.2e}" + (f"; {failed}" if failed else ""))


if __name__ == "__main__":
    exits.run(main)
