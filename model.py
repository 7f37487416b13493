"""The published SVHN multi-digit recognizer (ModelScope `Genius-Society/svhn`), rebuilt exactly.

The network with its published key names, reading its output, and building it from a state dict.
Files, devices and fast inference forms live in the `svhn` package beside this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from svhn.exits import UserError
from svhn.network import NetworkSpec

# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------

INPUT_SIZE = 54
CHANNELS = (3, 48, 64, 128, 160, 192, 192, 192, 192)
POOL_STRIDES = (2, 1, 2, 1, 2, 1, 2, 1)  # the side goes 54-28-29-15-16-9-10-6-7
FEATURES = 192 * 7 * 7
HIDDEN = 3072
HEADS = ("length", "digit1", "digit2", "digit3", "digit4", "digit5")
HEAD_CLASSES = (7, 11, 11, 11, 11, 11)  # length 0..6 (6: more than five); digit 0..9, 10: none
NUM_PARAMETERS = 42_868_734
BLANK = 10


def _conv_block(cin: int, cout: int, pool_stride: int) -> nn.Sequential:
    # Index order matters: it gives the published key names (_hiddenN.0 conv, _hiddenN.1 BN).
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=5, padding=2),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=2, stride=pool_stride, padding=1),
        nn.Dropout(0.2),
    )


class SVHNModel(nn.Module):
    """Eight conv blocks, two fully connected layers, six heads; input N x 3 x 54 x 54.

    forward() returns the six heads' logits (length, digit1 .. digit5) as a tuple, as the
    published model does.
    """

    def __init__(self) -> None:
        super().__init__()
        for i, stride in enumerate(POOL_STRIDES):
            setattr(self, f"_hidden{i + 1}", _conv_block(CHANNELS[i], CHANNELS[i + 1], stride))
        self._hidden9 = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU())
        self._hidden10 = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self._digit_length = nn.Sequential(nn.Linear(HIDDEN, HEAD_CLASSES[0]))
        for i in range(1, 6):
            setattr(self, f"_digit{i}", nn.Sequential(nn.Linear(HIDDEN, HEAD_CLASSES[i])))

    def blocks(self) -> list[nn.Sequential]:
        return [getattr(self, f"_hidden{i + 1}") for i in range(len(POOL_STRIDES))]

    def heads(self) -> list[nn.Sequential]:
        return [self._digit_length] + [getattr(self, f"_digit{i}") for i in range(1, 6)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for block in self.blocks():
            x = block(x)
        # flatten() follows the logical NCHW order whatever the memory format, as view() did
        # in the published code on a contiguous tensor.
        x = self._hidden10(self._hidden9(torch.flatten(x, 1)))
        return tuple(head(x) for head in self.heads())


def conv_layers() -> list[dict]:
    """Each convolution's input side, channels and FLOPs (multiply-adds counted twice)."""
    layers, side = [], INPUT_SIZE
    for i, stride in enumerate(POOL_STRIDES):
        flops = 2 * side * side * CHANNELS[i + 1] * CHANNELS[i] * 25
        layers.append({"side": side, "cin": CHANNELS[i], "cout": CHANNELS[i + 1], "flops": flops})
        side = (side + 2 - 2) // stride + 1  # max-pool, kernel 2, padding 1
    return layers


def flops_per_image() -> int:
    """Multiply-adds counted twice, convolutions and linear layers (1.587 GFLOP)."""
    fc = 2 * (FEATURES * HIDDEN + HIDDEN * HIDDEN + HIDDEN * sum(HEAD_CLASSES))
    return sum(layer["flops"] for layer in conv_layers()) + fc


# --------------------------------------------------------------------------------------------
# Reading the output
# --------------------------------------------------------------------------------------------


@dataclass
class Reading:
    """What the network read in one image.

    number: the first min(length, 5) digit classes with any blank (10) left out.
    digits: the five digit heads' classes, 10 meaning "no digit".
    confidence: p(length) * prod(p(digit_i) for i < min(length, 5)), the softmax maxima.
    """

    number: str
    length: int
    digits: list[int]
    confidence: float
    blank_dropped: bool  # a blank stood among the digits the length asked for
    length_over_5: bool  # the length head said "more than five"


def decode(logits: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> list[Reading]:
    """Turn the six heads' logits (each N x classes) into one Reading per image."""
    probs = [torch.softmax(t.detach().float().cpu(), dim=1) for t in logits]
    best = [p.max(dim=1) for p in probs]
    readings = []
    for n in range(probs[0].shape[0]):
        length = int(best[0].indices[n])
        digits = [int(best[h].indices[n]) for h in range(1, 6)]
        used = digits[: min(length, 5)]
        confidence = float(best[0].values[n])
        for h in range(1, len(used) + 1):
            confidence *= float(best[h].values[n])
        readings.append(
            Reading(
                number="".join(str(d) for d in used if d != BLANK),
                length=length,
                digits=digits,
                confidence=confidence,
                blank_dropped=BLANK in used,
                length_over_5=length > 5,
            )
        )
    return readings


def numbers(logits: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> list[str]:
    return [r.number for r in decode(logits)]


# What the network takes and gives, for the tools that serve any network (svhn.network).
SPEC = NetworkSpec("recognizer", (INPUT_SIZE, INPUT_SIZE), tuple((h, (c,)) for h, c in zip(HEADS, HEAD_CLASSES)), numbers)


# --------------------------------------------------------------------------------------------
# Building it from a state dict
# --------------------------------------------------------------------------------------------


class WeightsError(UserError, ValueError):
    """Weights that are not the published network's; the message names the source and what is wrong."""


def check_state_dict(state_dict: dict, source: object = "state dict") -> None:
    """Raise WeightsError naming every missing or unexpected key, wrong shape or dtype, NaN or Inf."""
    with torch.device("meta"):  # shapes and dtypes only: no memory, no random init
        expected = SVHNModel().state_dict()
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        problems.append(f"{len(missing)} missing keys ({_some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_some(unexpected)})")
    for key, value in expected.items():
        got = state_dict.get(key)
        if got is None:
            continue
        if tuple(got.shape) != tuple(value.shape):
            problems.append(f"{key} has shape {tuple(got.shape)}, expected {tuple(value.shape)}")
        elif value.is_floating_point() and not got.is_floating_point():
            # integer weights would load (copy_ casts) and read nothing
            problems.append(f"{key} is {str(got.dtype).replace('torch.', '')}, expected floating point")
    if problems:
        raise WeightsError(f"{source}: not the published SVHN network: " + "; ".join(problems))
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"{source}: NaN or Inf in {_some(bad)}")


def model_from_state_dict(state_dict: dict, source: object = "state dict") -> SVHNModel:
    """The network with these weights (checked first), in eval mode, on CPU, in fp32."""
    check_state_dict(state_dict, source)
    model = SVHNModel()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}, strict=True)
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _some(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
