"""What every network here shares: how it describes itself, how it runs on a device, and how its
output on a device is compared with the CPU fp32 reference.

A NetworkSpec says what a network takes and gives (its input size and named outputs), so that the
comparison, the ONNX exporter and checker, ONNX Runtime and the .om bridge serve any network
without knowing which. Runnable is "a network on a device": the PyTorch path (DeviceNet) and ONNX
Runtime (svhn.onnx_model.OnnxNet) both implement it, and every tool takes either.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from svhn import deviation
from svhn.devices import DeviceError, compile_module, default_channels_last


@dataclass(frozen=True)
class NetworkSpec:
    """A network's interface: `name`, its input (N x 3 x height x width float32, already
    normalised), its outputs in order with each one's shape after the batch dimension, and
    `readings`, which turns a batch's outputs into what each image reads as (compared for
    agreement), and optionally `agreement`, the network's own measures of how a target's
    outputs agree with the reference's (the localizer's box IoU)."""

    name: str
    input_size: tuple[int, int]
    outputs: tuple[tuple[str, tuple[int, ...]], ...]
    readings: Callable[[Sequence[torch.Tensor]], list[str]]
    agreement: Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], dict] | None = None

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.outputs)

    def input_shape(self, n: int) -> tuple[int, int, int, int]:
        return (n, 3, *self.input_size)


@runtime_checkable
class Runnable(Protocol):
    """A network prepared once for one device and dtype. prepare() moves a float32 CPU batch to
    where run() wants it; run() returns the outputs there; outputs() is both, brought back as
    float32 CPU tensors. settings says how it runs (kernels, memory format, graph mode)."""

    spec: NetworkSpec
    device: torch.device
    dtype: torch.dtype
    settings: dict

    def prepare(self, batch: torch.Tensor) -> Any: ...

    def run(self, x: Any) -> Sequence: ...

    def outputs(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


class DeviceNet:
    """A module on a device in a dtype: moved once, channels_last where the device likes it,
    optionally compiled (graph mode), always run under inference_mode.

    `kernels` names the module's form for reports; a caller that already built a CPU-specific
    form (svhn.recognizer's packed oneDNN net) passes it with place=False so it is not moved.
    Why graph mode was not had goes to `note`.
    """

    def __init__(
        self,
        module: nn.Module,
        spec: NetworkSpec,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        channels_last: bool | None = None,
        compile: bool = False,
        kernels: str = "eager",
        place: bool = True,
        note: Callable[[str], None] = lambda line: None,
        settings: dict | None = None,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        self.channels_last = default_channels_last(self.device, channels_last)
        net = module.eval()
        if place:
            net = net.to(device=self.device, dtype=dtype)
            if self.channels_last:
                net = net.to(memory_format=torch.channels_last)
        graph = "eager"
        if compile:
            try:
                net, graph = compile_module(net, self.device, self.prepare(torch.zeros(spec.input_shape(1))))
            except DeviceError as e:
                note(str(e))
        self.net = net
        self.settings = {
            **(settings or {}),
            "kernels": kernels,
            "memory_format": "channels_last" if self.channels_last else "nchw",
            "dtype": str(dtype).replace("torch.", ""),
            "graph_mode": graph,
        }

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """A float32 CPU batch moved to the device, dtype and memory format.

        Made under inference_mode, like every tensor the network sees: a compiled graph guards on
        that and would otherwise be compiled twice."""
        with torch.inference_mode():
            x = batch.to(device=self.device, dtype=self.dtype, non_blocking=True)
            return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs for a prepared batch, left on the device."""
        with torch.inference_mode():
            out = self.net(x)
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def outputs(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs for a CPU batch, as float32 on the CPU: flattened and joined on the device
        so that they come back in one copy (each copy from an accelerator waits for it)."""
        with torch.inference_mode():
            out = self.run(self.prepare(batch))
            n = out[0].shape[0]
            joined = torch.cat([o.reshape(n, -1) for o in out], dim=1).float().cpu()
            parts = torch.split(joined, [o[0].numel() for o in out], dim=1)
            return tuple(p.reshape(o.shape) for p, o in zip(parts, out))


def reference(module: nn.Module, spec: NetworkSpec) -> DeviceNet:
    """The reference every device is compared with: the module as it is (BatchNorm not folded)
    on the CPU in IEEE fp32, NCHW."""
    return DeviceNet(copy.deepcopy(module), spec, "cpu", torch.float32, channels_last=False, kernels="eager (published module)")


class Comparison:
    """Runs every batch through the CPU fp32 reference and a target of the same network, and
    reports how far apart they are (svhn.deviation's statistics and rules)."""

    def __init__(self, reference: Runnable, target: Runnable) -> None:
        self.reference = reference
        self.target = target
        self.spec = target.spec
        self.names: list[str] = []
        self._ref: list[tuple[torch.Tensor, ...]] = []
        self._out: list[tuple[torch.Tensor, ...]] = []

    def add(self, batch: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """Run one CPU batch on both; returns the target's outputs."""
        self._ref.append(self.reference.outputs(batch))
        self._out.append(self.target.outputs(batch))
        self.names += [str(n) for n in names]
        return self._out[-1]

    @property
    def latest_reference(self) -> tuple[torch.Tensor, ...]:
        """The reference's outputs for the batch added last (for a caller that goes on from them)."""
        return self._ref[-1]

    def report(self) -> dict:
        ref = [torch.cat([b[h] for b in self._ref]) for h in range(len(self.spec.outputs))]
        out = [torch.cat([b[h] for b in self._out]) for h in range(len(self.spec.outputs))]
        report = deviation.compare(ref, out, self.spec, self.target.dtype, self.names)
        report["reference"] = "cpu float32 IEEE, published module (BatchNorm not folded)"
        report["target"] = {"device": str(self.target.device), **self.target.settings}
        return report


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of an eval-mode module with every BatchNorm2d that follows a Conv2d inside an
    nn.Sequential folded into that convolution (torch's fuse_conv_bn_eval) and replaced by an
    identity: the same function, one pass over the activations fewer."""
    folded = copy.deepcopy(module).eval()
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    return folded
