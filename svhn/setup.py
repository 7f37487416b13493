"""The prologue every script that runs the network shares: the checkpoint found and loaded once,
the device resolved once, the fp32 mode set, and the network prepared on it (or the --onnx file
under ONNX Runtime). Each failure is a UserError naming what is wrong."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from model import SPEC, SVHNModel
from svhn import devices
from svhn.checkpoints import find_checkpoint, load_model
from svhn.exits import note
from svhn.flags import RunOptions
from svhn.network import Runnable
from svhn.onnx_model import OnnxNet
from svhn.recognizer import Recognizer
from svhn.text import shown


def resolve_device(spec: str, report: Callable[[str], None] = note) -> torch.device:
    """The device a --device flag names; why auto chose what it chose goes to `report`."""
    notes: list[str] = []
    device = devices.resolve(spec, notes)
    for line in notes:
        report(line)
    return device


def load_checkpoint(checkpoint: str | None) -> tuple[SVHNModel, Path]:
    """The recognizer from --checkpoint (or where find_checkpoint looks), and the file it came from."""
    path = find_checkpoint(checkpoint)
    return load_model(path), path


def recognizer(options: RunOptions, model: SVHNModel, device: torch.device) -> Recognizer:
    """The fast path as the device flags ask for it; why a faster form was not used, on stderr."""
    return Recognizer(model, device, devices.DTYPES[options.dtype], fold=options.fold, channels_last=options.channels_last,
                      compile=options.compile, note=note)


@dataclass
class Setup:
    model: SVHNModel | None
    checkpoint: Path | None
    device: torch.device
    fp32_mode: dict
    recognizer: Runnable

    def header(self) -> str:
        """One line saying what runs where, for the top of every script's output."""
        s = self.recognizer.settings
        if isinstance(self.recognizer, OnnxNet):
            return f"onnx {shown(s['onnx_file'])} (batch {s['batch']}, opset {s['opset']}) | {s['runtime']}, {s['provider']} | float32"
        return (
            f"checkpoint {shown(self.checkpoint)} | device {self.device} ({devices.device_name(self.device)}) | {s['dtype']} | "
            f"fp32 conv {self.fp32_mode['conv']}, matmul {self.fp32_mode['matmul']} | {s['kernels']}, {s['memory_format']}, graph {s['graph_mode']}"
        )


def setup(options: RunOptions, need_model: bool = True, device: torch.device | None = None) -> Setup:
    """Checkpoint, device, fp32 mode and recognizer as `options` ask (or the --onnx file, when the
    PyTorch model is needed only if need_model). `device`, when the caller already resolved it
    (a torchrun rank's), is used as it is."""
    if options.onnx:
        model, checkpoint = load_checkpoint(options.checkpoint) if need_model else (None, None)
        return Setup(model, checkpoint, torch.device("cpu"), {"conv": "ieee", "matmul": "ieee"}, OnnxNet(options.onnx, [SPEC]))
    model, checkpoint = load_checkpoint(options.checkpoint)
    device = device or resolve_device(options.device)
    mode = devices.set_fp32_mode(device, options.fp32_mode)
    return Setup(model, checkpoint, device, mode, recognizer(options, model, device))
