"""The network's inference form and the one object every caller runs it through.

InferenceNet computes SVHNModel's eval-mode function with fewer kernels (BatchNorm folded into
the convolutions, dropout gone, the six heads one matrix product). Recognizer prepares it once
for a device and dtype: on the CPU in fp32 its oneDNN-packed form (svhn.onednn) after that form
has proved itself on a batch, elsewhere channels_last eager, optionally compiled. Comparison runs
batches through the CPU fp32 reference and a Recognizer and reports their deviation.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from model import HEAD_CLASSES, HEADS, HIDDEN, INPUT_SIZE, Reading, SVHNModel, decode
from svhn import deviation
from svhn.devices import DeviceError, compile_module
from svhn.onednn import PackedCpuNet
from svhn.text import one_line


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution that computes bn(conv(x)) with running statistics, as eval mode does.

    scale = gamma / sqrt(var + eps); w' = w * scale; b' = (b - mean) * scale + beta.
    Computed in float64 so that the only rounding left is the final cast to fp32.
    """
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        fused.weight.copy_((conv.weight.double() * scale[:, None, None, None]).to(conv.weight.dtype))
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        fused.bias = nn.Parameter(((bias - bn.running_mean.double()) * scale + bn.bias.double()).to(conv.weight.dtype))
    return fused


class InferenceNet(nn.Module):
    """The same function as SVHNModel in eval mode, with fewer kernels to launch.

    Each block is conv (BN folded in) -> ReLU -> max-pool; the six heads are one Linear whose
    output is split, so a batch costs one matrix product instead of six.
    """

    def __init__(self, model: SVHNModel) -> None:
        super().__init__()
        layers = []
        for block in model.blocks():
            conv, bn, pool = block[0], block[1], block[3]
            layers += [fold_batchnorm(conv, bn), nn.ReLU(inplace=True), copy.deepcopy(pool)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            copy.deepcopy(model._hidden9[0]), nn.ReLU(inplace=True),
            copy.deepcopy(model._hidden10[0]), nn.ReLU(inplace=True),
        )
        heads = [h[0] for h in model.heads()]
        self.heads = nn.Linear(HIDDEN, sum(HEAD_CLASSES))
        with torch.no_grad():
            self.heads.weight.copy_(torch.cat([h.weight for h in heads]))
            self.heads.bias.copy_(torch.cat([h.bias for h in heads]))
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.fc(torch.flatten(self.features(x), 1))
        return torch.split(self.heads(x), HEAD_CLASSES, dim=1)


def check_batch(seed: int = 0, n: int = 4) -> torch.Tensor:
    """A seeded batch of uniform noise in the network's input range, for self-checks."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, INPUT_SIZE, INPUT_SIZE, generator=g) * 2 - 1


def packed_cpu_net(net: InferenceNet) -> PackedCpuNet:
    """The oneDNN-packed form of `net`, after one batch through both agreed under the fp32
    rules; raises RuntimeError saying why not (a missing or changed op, or wrong numbers)."""
    try:
        packed = PackedCpuNet(net)
        x = check_batch()
        with torch.inference_mode():
            want, got = net(x.contiguous(memory_format=torch.channels_last)), packed(x)
    except Exception as e:  # private ops: a changed schema raises anything
        raise RuntimeError(f"{type(e).__name__}: {one_line(e, 160)}") from None
    report = deviation.compare(want, got)
    if report["verdict"] != "PASS":
        failed = sorted({rule for h in report["heads"].values() for rule in h["failed"]})
        raise RuntimeError(f"its output disagrees with the plain network ({'; '.join(failed)}, max abs {report['max_abs']:.3g})")
    return packed


class Recognizer:
    """The network prepared once for one device and dtype; batches in, logits or Readings out.

    fold=True (the default) runs InferenceNet: BatchNorm folded, heads merged, dropout gone;
    on the CPU in fp32 its oneDNN-packed form when that form proves itself. fold=False runs the
    published module as it is, for comparison. channels_last defaults to on for CPU and CUDA,
    off for the NPU, whose kernels choose their own layouts. compile=True asks for graph mode.
    Why a faster form was not used goes to `note` (default: kept in self.notes).
    """

    def __init__(
        self,
        model: SVHNModel,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        fold: bool = True,
        channels_last: bool | None = None,
        compile: bool = False,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.notes: list[str] = []
        self.note = note or self.notes.append
        self.channels_last = (self.device.type != "npu") if channels_last is None else channels_last
        plain: nn.Module = InferenceNet(model) if fold else copy.deepcopy(model).eval()
        net, kernels = None, "eager"
        if fold and self.device.type == "cpu" and dtype == torch.float32 and not compile and self.channels_last:
            try:
                net, kernels, self.channels_last = packed_cpu_net(plain), "onednn-packed", True
            except RuntimeError as e:
                self.note(f"oneDNN-packed CPU path not used ({e}); running the channels_last eager path")
        if net is None:
            net = plain.to(device=self.device, dtype=dtype)
            if self.channels_last:
                net = net.to(memory_format=torch.channels_last)
        graph = "eager"
        if compile:
            try:
                net, graph = compile_module(net, self.device, self.prepare(check_batch(n=1)))
            except DeviceError as e:
                self.note(str(e))
        self.net = net
        self.settings = {
            "folded_batchnorm": fold,
            "kernels": kernels,
            "memory_format": "channels_last" if self.channels_last else "nchw",
            "dtype": str(dtype).replace("torch.", ""),
            "graph_mode": graph,
        }

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """A float32 N x 3 x 54 x 54 CPU batch moved to the device, dtype and memory format.

        Made under inference_mode, like every tensor the network sees: a compiled graph guards on
        that and would otherwise be compiled twice."""
        with torch.inference_mode():
            x = batch.to(device=self.device, dtype=self.dtype, non_blocking=True)
            return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The six heads' logits for a prepared batch, left on the device."""
        with torch.inference_mode():
            return self.net(x)

    def logits(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The six heads' logits for a CPU batch, as float32 on the CPU (one copy back)."""
        with torch.inference_mode():
            out = torch.cat(self.run(self.prepare(batch)), dim=1).float().cpu()
        return torch.split(out, HEAD_CLASSES, dim=1)

    def read(self, batch: torch.Tensor) -> list[Reading]:
        return decode(self.logits(batch))


def reference(model: SVHNModel) -> Recognizer:
    """The reference every device is compared with: the published module (BatchNorm not
    folded) on the CPU in IEEE fp32, NCHW."""
    return Recognizer(model, "cpu", torch.float32, fold=False, channels_last=False)


class Comparison:
    """Runs every batch through the CPU fp32 reference and a target, and reports how far apart
    they are (svhn.deviation's statistics and rules)."""

    def __init__(self, model: SVHNModel, target) -> None:
        self.reference = reference(model)
        self.target = target
        self.names: list[str] = []
        self._ref: list[tuple[torch.Tensor, ...]] = []
        self._out: list[tuple[torch.Tensor, ...]] = []

    def add(self, batch: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """Run one CPU batch on both; returns the target's logits."""
        self._ref.append(self.reference.logits(batch))
        self._out.append(self.target.logits(batch))
        self.names += [str(n) for n in names]
        return self._out[-1]

    def report(self) -> dict:
        heads = range(len(HEADS))
        ref = [torch.cat([b[h] for b in self._ref]) for h in heads]
        out = [torch.cat([b[h] for b in self._out]) for h in heads]
        report = deviation.compare(ref, out, self.target.dtype, self.names)
        report["reference"] = "cpu float32 IEEE, published module (BatchNorm not folded)"
        report["target"] = {"device": str(self.target.device), **self.target.settings}
        return report
