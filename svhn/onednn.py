"""The network's oneDNN-packed form, the fast fp32 path on x86 CPUs.

It rests on three private oneDNN entry points of torch (the ones torch.compile's freezing pass
uses). Private means they can change or vanish in any release, so they are looked up in one
place (`ops()`), and the caller (svhn.recognizer) checks a batch through this form against the
plain one before trusting it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from model import HEAD_CLASSES, conv_layers


class OneDnnOps(NamedTuple):
    reorder_conv_weight: Callable  # (mkldnn weight, padding, stride, dilation, groups, input shape)
    conv_pointwise: Callable  # (x, w, b, padding, stride, dilation, groups, attr, scalars, algorithm)
    linear: Callable  # (mkldnn x, mkldnn w, mkldnn b)


def ops() -> OneDnnOps:
    """The private ops this form needs; raises RuntimeError naming the one that is missing."""
    if not torch.backends.mkldnn.is_available():
        raise RuntimeError("this torch was built without oneDNN")
    found = []
    for owner, name in ((torch._C._nn, "mkldnn_reorder_conv2d_weight"), (torch.ops.mkldnn, "_convolution_pointwise"), (torch._C._nn, "mkldnn_linear")):
        try:
            found.append(getattr(owner, name))
        except (AttributeError, RuntimeError):  # torch.ops raises RuntimeError for an unknown op
            raise RuntimeError(f"torch {torch.__version__} has no oneDNN op {name}") from None
    return OneDnnOps(*found)


class PackedCpuNet(nn.Module):
    """InferenceNet (svhn.recognizer) with its weights packed once for oneDNN.

    Convolution weights are reordered into oneDNN's blocked layout at build time instead of at
    every call, and each convolution runs with its ReLU fused; the fully connected layers run as
    oneDNN inner products, which stream the 150 MB of fc weights faster than BLAS's
    matrix-vector product at batch 1. Activations are channels_last between the layers.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.ops = ops()
        self.convs = []
        layers = list(net.features)
        for conv, pool, geometry in zip(layers[0::3], layers[2::3], conv_layers()):
            shape = [1, geometry["cin"], geometry["side"], geometry["side"]]  # the input this convolution sees
            w = self.ops.reorder_conv_weight(conv.weight.detach().to_mkldnn(), conv.padding, conv.stride, conv.dilation, conv.groups, shape)
            self.convs.append((w, conv.bias.detach(), conv.padding, conv.stride, conv.dilation, pool))
        self.linears = [(lin.weight.detach().to_mkldnn(), lin.bias.detach().to_mkldnn()) for lin in (net.fc[0], net.fc[2], net.heads)]
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.contiguous(memory_format=torch.channels_last)
        for w, b, padding, stride, dilation, pool in self.convs:
            x = pool(self.ops.conv_pointwise(x, w, b, padding, stride, dilation, 1, "relu", [], ""))
        x = torch.flatten(x, 1).to_mkldnn()  # flatten() gives NCHW order, as in the original
        for i, (w, b) in enumerate(self.linears):
            x = self.ops.linear(x, w, b)
            if i < len(self.linears) - 1:
                x = torch.relu_(x)
        return torch.split(x.to_dense(), HEAD_CLASSES, dim=1)
