"""What every command-line script here shares: the model and device flags, turning their
failures into one line on stderr and an exit status, and writing results as JSON or Markdown."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

import device as dev
from model import CheckpointError, Recognizer, SVHNModel, find_checkpoint, load_model

ROOT = Path(__file__).resolve().parent
EXAMPLES = ROOT / "examples"
EXIT_FAILED = 1  # an image failed, or a comparison said FAIL
EXIT_USAGE = 2  # bad flags, no checkpoint, no such device


def shown(path: Path) -> str:
    """A path as a user would type it: relative to the working directory when inside it."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def die(message: str, status: int = EXIT_USAGE) -> None:
    error(message)
    sys.exit(status)


def run(main) -> None:
    """Run a script's main() and exit with its status; what a user can cause (Ctrl-C, a closed
    pipe, a batch too large for the memory) ends with one line instead of a traceback."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_FAILED)
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError too
        text = str(e)
        if "out of memory" in text.lower() or "can't allocate memory" in text:
            die(f"out of memory ({text.splitlines()[0][:160]}); use a smaller --batch-size", EXIT_FAILED)
        raise


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="a model-<step>.pth file or a folder of them (newest step taken); default: $SVHN_CHECKPOINT, "
        "./checkpoints, the ModelScope cache, else a download of Genius-Society/svhn",
    )


def add_device_args(parser: argparse.ArgumentParser, default_device: str = "auto") -> argparse._ArgumentGroup:
    group = parser.add_argument_group("device and precision")
    group.add_argument("--device", default=default_device, help="auto, cpu, npu, npu:N, cuda, cuda:N (default: %(default)s)")
    group.add_argument("--dtype", default="float32", choices=list(dev.DTYPES), help="compute dtype (default: %(default)s)")
    group.add_argument(
        "--fp32-mode",
        default="default",
        choices=dev.FP32_MODES,
        help="default: the device's own (Ascend HF32 / CUDA TF32 convolutions); strict: IEEE fp32 everywhere; "
        "fast: HF32/TF32 for matrix products too",
    )
    group.add_argument(
        "--channels-last",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="NHWC activations (default: on for CPU and CUDA, off for NPU)",
    )
    group.add_argument("--no-fold", action="store_true", help="run the published module as it is (BatchNorm not folded)")
    group.add_argument("--compile", action="store_true", help="graph mode: torch.compile / CUDA graphs / torchair where available")
    return group


def load_model_or_exit(args: argparse.Namespace) -> tuple[SVHNModel, Path]:
    try:
        path = find_checkpoint(args.checkpoint)
        return load_model(path), path
    except CheckpointError as e:
        die(str(e))


def device_or_exit(spec: str) -> torch.device:
    notes: list[str] = []
    try:
        device = dev.resolve(spec, notes)
    except dev.DeviceError as e:
        die(str(e))
    for line in notes:
        note(line)
    return device


def setup_or_exit(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, dict]:
    """The device, dtype and fp32 mode the flags ask for."""
    device = device_or_exit(args.device)
    mode = dev.set_fp32_mode(device, args.fp32_mode)
    return device, dev.DTYPES[args.dtype], mode


def recognizer(args: argparse.Namespace, model: SVHNModel, device: torch.device, dtype: torch.dtype) -> Recognizer:
    """The fast path as the device flags ask for it; its notes (graph mode fallbacks) on stderr."""
    rec = Recognizer(model, device, dtype, fold=not args.no_fold, channels_last=args.channels_last, compile=args.compile)
    for line in rec.notes:
        note(line)
    return rec


def plain(obj):
    """JSON-safe: NaN and Inf become None, tensors and paths become lists and strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return plain(obj.tolist())
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    return obj


def write_json(path: str | Path, obj) -> None:
    """Write obj to path ('-' for stdout)."""
    text = json.dumps(plain(obj), indent=2)
    if str(path) == "-":
        print(text)
        return
    try:
        Path(path).write_text(text + "\n")
    except OSError as e:
        die(f"{path}: cannot write ({e.strerror or e})", EXIT_FAILED)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
