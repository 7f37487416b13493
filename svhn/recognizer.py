"""The recognizer's inference form: what is specific to this network on top of svhn.network.

InferenceNet computes SVHNModel's eval-mode function with fewer kernels (BatchNorm folded into
the convolutions, dropout gone, the six heads one matrix product). Recognizer prepares it once
for a device and dtype: on the CPU in fp32 its oneDNN-packed form (svhn.onednn) after that form
has proved itself on a batch, elsewhere svhn.network.DeviceNet's channels_last eager path,
optionally compiled.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from model import HEAD_CLASSES, HIDDEN, SPEC, Reading, SVHNModel, decode
from svhn import deviation
from svhn.devices import default_channels_last
from svhn.images import random_input
from svhn.network import DeviceNet, reference as network_reference
from svhn.onednn import PackedCpuNet
from svhn.text import one_line

def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution that computes bn(conv(x)) with running statistics, as eval mode does
    (torch's fuse_conv_bn_weights). Our own float64 fold was measured against a float64 forward
    of conv+BN: 4.34e-7 against 4.81e-7 of the output's range for torch's, both a few fp32
    roundings, so torch's is used."""
    fused = copy.deepcopy(conv)
    fused.weight, fused.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
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


def packed_cpu_net(net: InferenceNet) -> PackedCpuNet:
    """The oneDNN-packed form of `net`, after one batch through both agreed under the fp32
    rules; raises RuntimeError saying why not (a missing or changed op, or wrong numbers)."""
    try:
        packed = PackedCpuNet(net)
        x = random_input(4, seed=0)
        with torch.inference_mode():
            want, got = net(x.contiguous(memory_format=torch.channels_last)), packed(x)
    except Exception as e:  # private ops: a changed schema raises anything
        raise RuntimeError(f"{type(e).__name__}: {one_line(e, 160)}") from None
    report = deviation.compare(want, got, SPEC)
    if report["verdict"] != "PASS":
        raise RuntimeError(f"its output disagrees with the plain network ({deviation.failed_summary(report)}, max abs {report['max_abs']:.3g})")
    return packed


class Recognizer(DeviceNet):
    """The recognizer prepared once for one device and dtype; batches in, logits or Readings out.

    fold=True (the default) runs InferenceNet: BatchNorm folded, heads merged, dropout gone;
    on the CPU in fp32 its oneDNN-packed form when that form proves itself. fold=False runs the
    published module as it is, for comparison. The rest (device, dtype, channels_last, graph
    mode) is svhn.network.DeviceNet's. Why a faster form was not used goes to `note`.
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
        note: Callable[[str], None] = lambda line: None,
    ) -> None:
        device = torch.device(device)
        plain: nn.Module = InferenceNet(model) if fold else copy.deepcopy(model).eval()
        if fold and device.type == "cpu" and dtype == torch.float32 and not compile and default_channels_last(device, channels_last):
            try:
                packed = packed_cpu_net(plain)
                super().__init__(packed, SPEC, device, dtype, channels_last=True, kernels="onednn-packed", place=False,
                                 settings={"folded_batchnorm": True})
                return
            except RuntimeError as e:
                note(f"oneDNN-packed CPU path not used ({e}); running the channels_last eager path")
        super().__init__(plain, SPEC, device, dtype, channels_last=channels_last, compile=compile, note=note, settings={"folded_batchnorm": fold})

    def read(self, batch: torch.Tensor) -> list[Reading]:
        return decode(self.outputs(batch))


def reference(model: SVHNModel) -> DeviceNet:
    """The recognizer's reference: the published module (BatchNorm not folded) on the CPU in
    IEEE fp32, NCHW."""
    return network_reference(model, SPEC)
