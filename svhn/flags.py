"""The command-line flags the scripts share, declared once, and the values they stand for."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from svhn import devices

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


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
    add_workers_arg(group)


def add_workers_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--workers", type=non_negative_int, default=2, help="threads decoding images ahead; 0: decode in the main thread (default: %(default)s)")


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
    add_localizer_arg(group)


def add_onnx_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument_group("onnx").add_argument(
        "--onnx",
        nargs="+",
        metavar="FILE.onnx",
        help="run these exported files (export.py: the recognizer's, and the localizer's for --find) with ONNX Runtime "
        "instead of the PyTorch models; each file's network is told by its outputs; the execution provider is the first "
        "installed of CANN, CUDA, CPU (the checkpoints are then only the references of --compare)",
    )


def add_localizer_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--localizer", metavar="PATH", help="the localizer's checkpoint (a localizer-<step>.pth or a folder of them); "
                       "default: $SVHN_LOCALIZER, else the one shipped in weights/")


def add_device_arg(group: argparse._ArgumentGroup, default: str = "auto") -> None:
    group.add_argument("--device", default=default, help="auto, cpu, npu, npu:N, cuda, cuda:N (default: %(default)s); "
                       "under torchrun each rank takes its LOCAL_RANK")


def add_channels_last_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                       help="NHWC activations (default: on for CPU and CUDA, off for NPU)")


def add_device_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("device and precision")
    add_device_arg(group)
    group.add_argument("--dtype", default="float32", choices=list(devices.DTYPES), help="compute dtype (default: %(default)s)")
    group.add_argument(
        "--fp32-mode",
        default="default",
        choices=devices.FP32_MODES,
        help="default: the device's own (Ascend HF32 / CUDA TF32 convolutions); strict: IEEE fp32 everywhere; "
        "fast: HF32/TF32 for matrix products too",
    )
    add_channels_last_arg(group)
    group.add_argument("--no-fold", action="store_true", help="run the published module as it is (BatchNorm not folded)")
    group.add_argument("--compile", action="store_true", help="graph mode: torch.compile / CUDA graphs / torchair where available")
    return group


@dataclass(frozen=True)
class RunOptions:
    """What the model and device flags ask for, as plain values (see add_run_args)."""

    checkpoint: str | None = None
    localizer: str | None = None
    onnx: tuple[str, ...] = ()
    device: str = "auto"
    dtype: str = "float32"
    fp32_mode: str = "default"
    channels_last: bool | None = None
    fold: bool = True
    compile: bool = False


def run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        checkpoint=getattr(args, "checkpoint", None), localizer=getattr(args, "localizer", None), onnx=tuple(getattr(args, "onnx", None) or ()),
        device=args.device, dtype=args.dtype,
        fp32_mode=getattr(args, "fp32_mode", "default"), channels_last=getattr(args, "channels_last", None),
        fold=not getattr(args, "no_fold", False), compile=getattr(args, "compile", False),
    )
