"""The prologue every script that runs the networks shares: the checkpoints found and loaded once,
the device resolved once, the fp32 mode set, and the recognizer (and, to find numbers, the
localizer) prepared on it (or the --onnx files under ONNX Runtime). Each failure is a UserError naming what is wrong."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import localizer
from localizer import Localizer
from model import SPEC, SVHNModel
from svhn import devices
from svhn.checkpoints import find_checkpoint, find_localizer, load_localizer, load_model
from svhn.exits import note
from svhn.flags import RunOptions
from svhn.network import DeviceNet, NetworkSpec, Runnable, fold_batchnorm
from svhn.onnx_model import OnnxError, OnnxNet
from svhn.recognizer import Recognizer
from svhn.text import printable, shown


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


def localizer_net(options: RunOptions, model: Localizer, device: torch.device) -> DeviceNet:
    """The localizer as the device flags ask for it: BatchNorm folded (unless --no-fold), in the
    dtype, memory format and graph mode asked for."""
    return DeviceNet(fold_batchnorm(model) if options.fold else model, localizer.spec(model.arch_name), device, devices.DTYPES[options.dtype],
                     channels_last=options.channels_last, compile=options.compile, kernels="eager, BatchNorm folded" if options.fold else "eager",
                     note=note)


@dataclass
class Setup:
    model: SVHNModel | None
    checkpoint: Path | None
    device: torch.device
    fp32_mode: dict
    recognizer: Runnable
    localizer_model: Localizer | None = None  # with find: the localizer, its file and how it runs
    localizer_path: Path | None = None
    localizer: Runnable | None = None

    def header(self) -> str:
        """One line saying what runs where, for the top of every script's output."""
        line = self._describe(self.recognizer, f"checkpoint {shown(self.checkpoint)}")
        if self.localizer is not None:
            line += " || " + self._describe(self.localizer, f"localizer {shown(self.localizer_path)} ({self.localizer_model.arch_name})")
        return line

    def _describe(self, net: Runnable, source: str) -> str:
        s = net.settings
        if isinstance(net, OnnxNet):
            return f"onnx {shown(s['onnx_file'])} (batch {s['batch']}, opset {s['opset']}) | {s['runtime']}, {s['provider']} | float32"
        return (
            f"{source} | device {self.device} ({devices.device_name(self.device)}) | {s['dtype']} | "
            f"fp32 conv {self.fp32_mode['conv']}, matmul {self.fp32_mode['matmul']} | {s['kernels']}, {s['memory_format']}, graph {s['graph_mode']}"
        )


def onnx_nets(paths: tuple[str, ...], specs: list[NetworkSpec]) -> dict[str, OnnxNet]:
    """The --onnx files by the network each holds (told by its outputs); one file per network."""
    nets: dict[str, OnnxNet] = {}
    for path in paths:
        net = OnnxNet(path, specs)
        if net.spec.name in nets:
            raise OnnxError(f"{printable(path)}: a second {net.spec.name} file (the first: {printable(nets[net.spec.name].path)}); give one per network")
        nets[net.spec.name] = net
    return nets


def setup(options: RunOptions, need_model: bool = True, device: torch.device | None = None, find: bool = False) -> Setup:
    """Checkpoint, device, fp32 mode and recognizer as `options` ask, and with `find` the
    localizer (or the --onnx files, when the PyTorch models are needed only if need_model).
    `device`, when the caller already resolved it (a torchrun rank's), is used as it is."""
    found = find_localizer(options.localizer) if find else None
    loc = load_localizer(found) if found else None
    if options.onnx:
        nets = onnx_nets(options.onnx, [SPEC] + ([localizer.spec(loc.arch_name)] if loc else []))
        for name in ["recognizer"] + (["localizer"] if find else []):
            if name not in nets:
                raise OnnxError(f"--onnx: no {name} among {', '.join(printable(p) for p in options.onnx)}; export it with python export.py --network {name}")
        model, checkpoint = load_checkpoint(options.checkpoint) if need_model else (None, None)
        return Setup(model, checkpoint, torch.device("cpu"), {"conv": "ieee", "matmul": "ieee"}, nets["recognizer"], loc, found, nets.get("localizer"))
    model, checkpoint = load_checkpoint(options.checkpoint)
    device = device or resolve_device(options.device)
    mode = devices.set_fp32_mode(device, options.fp32_mode)
    return Setup(model, checkpoint, device, mode, recognizer(options, model, device), loc, found, localizer_net(options, loc, device) if loc else None)
