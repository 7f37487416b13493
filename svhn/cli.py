"""What every command-line script here shares: the flags, the prologue (checkpoint, device,
recognizer), the loop over images that reports the ones that fail, one-line errors and exit
statuses, and results written as streamed JSON or Markdown."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from model import SVHNModel, WeightsError
from svhn import devices
from svhn.checkpoints import find_checkpoint, load_model
from svhn.images import load_ahead
from svhn.onnx_model import OnnxError, OnnxRecognizer
from svhn.recognizer import Recognizer
from svhn.text import one_line, printable, shown

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
EXIT_FAILED = 1  # an image failed, or a comparison said FAIL
EXIT_USAGE = 2  # bad flags, no checkpoint, no such device
EXIT_INTERRUPTED = 130


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def die(message: str, status: int = EXIT_USAGE) -> None:
    error(message)
    sys.exit(status)


def run(main: Callable[[], int]) -> None:
    """Run a script's main() and exit with its status; what a user can cause (Ctrl-C, a closed
    pipe, a batch too large for the memory) ends with one line instead of a traceback."""
    for stream in (sys.stdout, sys.stderr):  # a path that the terminal cannot encode prints escaped
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        try:
            sys.exit(main())
        finally:  # whatever ended the run, every JSON output it opened is left a valid document
            for out in list(JsonOutput.unfinished):
                try:
                    out.finish(complete=False)
                except OSError:  # a closed pipe: nobody reads it any more
                    pass
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # `... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_FAILED)
    except (torch.OutOfMemoryError, MemoryError) as e:
        die(f"out of memory ({type(e).__name__}: {one_line(e, 160)}); use a smaller --batch-size", EXIT_FAILED)
    except RuntimeError as e:
        # torch's CPU allocator raises a plain RuntimeError (c10::Error), not OutOfMemoryError,
        # so its own wording is the only sign; anything else is a bug and keeps its traceback.
        if "DefaultCPUAllocator: can't allocate memory" not in str(e):
            raise
        die(f"out of memory on the CPU ({one_line(e, 160)}); use a smaller --batch-size", EXIT_FAILED)


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def _int_from(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_from(text, 1)


def non_negative_int(text: str) -> int:
    return _int_from(text, 0)


def add_loader_args(group: argparse._ArgumentGroup, batch_size: int) -> None:
    group.add_argument("--batch-size", type=positive_int, default=batch_size, help="images per forward pass (default: %(default)s)")
    group.add_argument("--workers", type=positive_int, default=2, help="threads decoding images ahead (default: %(default)s)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """What every script that runs the network takes: the checkpoint, --onnx, the device flags."""
    add_model_args(parser)
    add_onnx_arg(parser)
    add_device_args(parser)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="a model-<step>.pth file or a folder of them (newest step taken); default: $SVHN_CHECKPOINT, "
        "./checkpoints, the ModelScope cache, else a download of Genius-Society/svhn",
    )


def add_onnx_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument_group("onnx").add_argument(
        "--onnx",
        metavar="FILE.onnx",
        help="run this exported file (export.py) with ONNX Runtime instead of the PyTorch model; the execution provider "
        "is the first installed of CANN, CUDA, CPU (the checkpoint is then only the reference of --compare)",
    )


def add_device_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("device and precision")
    group.add_argument("--device", default="auto", help="auto, cpu, npu, npu:N, cuda, cuda:N (default: %(default)s)")
    group.add_argument("--dtype", default="float32", choices=list(devices.DTYPES), help="compute dtype (default: %(default)s)")
    group.add_argument(
        "--fp32-mode",
        default="default",
        choices=devices.FP32_MODES,
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


# --------------------------------------------------------------------------------------------
# The prologue every script shares
# --------------------------------------------------------------------------------------------


def load_model_or_exit(checkpoint: str | None) -> tuple[SVHNModel, Path]:
    try:
        path = find_checkpoint(checkpoint)
        return load_model(path), path
    except WeightsError as e:
        die(str(e))


def device_or_exit(spec: str) -> torch.device:
    notes: list[str] = []
    try:
        device = devices.resolve(spec, notes)
    except devices.DeviceError as e:
        die(str(e))
    for line in notes:
        note(line)
    return device


def recognizer(args: argparse.Namespace, model: SVHNModel, device: torch.device) -> Recognizer:
    """The fast path as the device flags ask for it; why a faster form was not used, on stderr."""
    return Recognizer(
        model, device, devices.DTYPES[args.dtype], fold=not args.no_fold, channels_last=args.channels_last, compile=args.compile, note=note
    )


@dataclass
class Setup:
    model: SVHNModel | None
    checkpoint: Path | None
    device: torch.device
    fp32_mode: dict
    recognizer: Recognizer | OnnxRecognizer

    def header(self, dtype: str) -> str:
        s = self.recognizer.settings
        if isinstance(self.recognizer, OnnxRecognizer):
            return f"onnx {shown(s['onnx_file'])} (batch {s['batch']}, opset {s['opset']}) | {s['runtime']}, {s['provider']} | float32"
        return (
            f"checkpoint {shown(self.checkpoint)} | device {self.device} ({devices.device_name(self.device)}) | {dtype} | "
            f"fp32 conv {self.fp32_mode['conv']}, matmul {self.fp32_mode['matmul']} | {s['kernels']}, {s['memory_format']}, graph {s['graph_mode']}"
        )


def setup(args: argparse.Namespace, need_model: bool = True) -> Setup:
    """Checkpoint, device, fp32 mode and recognizer as the model and device flags ask (or the
    --onnx file, when the PyTorch model is needed only if need_model); exits with one line when
    any of them cannot be had."""
    if getattr(args, "onnx", None):
        model, checkpoint = load_model_or_exit(args.checkpoint) if need_model else (None, None)
        try:
            target = OnnxRecognizer(args.onnx)
        except OnnxError as e:
            die(str(e))
        return Setup(model, checkpoint, torch.device("cpu"), {"conv": "ieee", "matmul": "ieee"}, target)
    model, checkpoint = load_model_or_exit(args.checkpoint)
    device = device_or_exit(args.device)
    mode = devices.set_fp32_mode(device, args.fp32_mode)
    return Setup(model, checkpoint, device, mode, recognizer(args, model, device))


class Failures:
    """Counts inputs that could not be read; each is reported on stderr as it happens."""

    def __init__(self, lines: Iterable[str] = ()) -> None:
        self.count = 0
        self.report(lines)

    def report(self, lines: Iterable[str]) -> None:
        for line in lines:
            error(line)
            self.count += 1


def batches(items: Sequence, load: Callable, args: argparse.Namespace, failures: Failures) -> Iterator[tuple[list, torch.Tensor]]:
    """(items, input batch) for every batch with at least one readable item; the others are
    reported through `failures`."""
    for done, batch, errors in load_ahead(items, load, args.batch_size, args.workers):
        failures.report(message for _, message in errors)
        if batch is not None:
            yield done, batch


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


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
        return printable(obj)
    if isinstance(obj, str):
        return printable(obj)
    return obj


def _dumps(obj, indent: int = 2) -> str:
    return json.dumps(plain(obj), indent=indent)


class JsonOutput:
    """A JSON document written as results come: opened (so checked) before the first image,
    each item flushed as it is added, and closed into a valid document whatever ends the run.

    items_key=None writes a bare list of items. Otherwise an object: `head`'s entries, then the
    items (if any) under items_key, then what finish() is given and "complete": true. A run that
    ends before finish() (Ctrl-C, an error) still leaves a valid document, "complete": false:
    the context manager closes it, and so does cli.run for every output still open.
    """

    unfinished: list["JsonOutput"] = []  # for cli.run to close

    def __init__(self, path: str | os.PathLike, items_key: str | None = "images", head: dict | None = None) -> None:
        self.path = str(path)
        self.items_key = items_key
        try:
            self.file = sys.stdout if self.path == "-" else open(self.path, "w", encoding="utf-8")
        except OSError as e:
            die(f"{printable(self.path)}: cannot write the JSON output ({e.strerror or one_line(e)})")
        self.count = 0
        self.entries = 0  # top-level entries of the object written so far
        self.closed = False
        JsonOutput.unfinished.append(self)
        self._write("[" if items_key is None else "{")
        for key, value in (head or {}).items():
            self._entry(key, value)

    def _write(self, text: str) -> None:
        self.file.write(text)
        self.file.flush()

    def _entry(self, key: str, value) -> None:
        text = _dumps(value).replace("\n", "\n  ")
        self._write(("," if self.entries else "") + f"\n  {json.dumps(key)}: {text}")
        self.entries += 1

    def add(self, item: dict) -> None:
        if self.items_key is not None and not self.count:
            self._write(("," if self.entries else "") + f"\n  {json.dumps(self.items_key)}: [")
            self.entries += 1
        self._write(("," if self.count else "") + "\n    " + _dumps(item, indent=None))
        self.count += 1

    def finish(self, tail: dict | None = None, complete: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        JsonOutput.unfinished.remove(self)
        if self.items_key is None:
            self._write("\n]\n")
        else:
            if self.count:
                self._write("\n  ]")
            for key, value in {**(tail or {}), "complete": complete}.items():
                self._entry(key, value)
            self._write("\n}\n")
        if self.file is not sys.stdout:
            self.file.close()

    def __enter__(self) -> "JsonOutput":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is BrokenPipeError:
            return  # nobody is reading any more
        self.finish(complete=False)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
