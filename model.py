"""The published SVHN multi-digit recognizer (ModelScope `Genius-Society/svhn`), rebuilt exactly.

One idea per section: the network, reading its output, loading its weights, finding them,
and the inference-only form of the network (BatchNorm folded, heads merged).
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import socket
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

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


def flops_per_image() -> int:
    """Multiply-adds counted twice, convolutions and linear layers (1.587 GFLOP)."""
    flops, side = 0, INPUT_SIZE
    for i, stride in enumerate(POOL_STRIDES):
        flops += 2 * side * side * CHANNELS[i + 1] * CHANNELS[i] * 25
        side = (side + 2 - 2) // stride + 1
    flops += 2 * (FEATURES * HIDDEN + HIDDEN * HIDDEN + HIDDEN * sum(HEAD_CLASSES))
    return flops


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

    def as_dict(self) -> dict:
        return {
            "number": self.number,
            "length": self.length,
            "digits": self.digits,
            "confidence": self.confidence,
            "blank_dropped": self.blank_dropped,
            "length_over_5": self.length_over_5,
        }


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


# --------------------------------------------------------------------------------------------
# Loading the weights
# --------------------------------------------------------------------------------------------


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
_CHECKPOINT_NAME = re.compile(r"model-(\d+)\.pth$")


def normalise_keys(state_dict: dict) -> dict:
    """Strip the prefixes that DataParallel and torch.compile add to every key."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def checkpoint_in_dir(directory: Path) -> Path:
    """The highest-step model-<step>.pth in a directory."""
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _CHECKPOINT_NAME.search(p.name))]
    if not found:
        raise CheckpointError(f"{directory}: no model-<step>.pth file in this folder")
    return max(found)[1]


def load_state_dict(path: str | os.PathLike) -> dict:
    """Read a checkpoint file (or the newest one in a folder) as a plain state dict, on CPU."""
    path = Path(path)
    if path.is_dir():
        path = checkpoint_in_dir(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns before it refuses; the refusal says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only=True refuses any pickled global (a class, a function such as os.system).
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(
                f"{path}: refused, it holds pickled Python code or objects ({found.group(1)}), not only tensors; "
                "only plain state dicts are loaded (weights_only=True). Re-save it with torch.save(model.state_dict())"
            ) from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({_first_line(e)})") from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return normalise_keys(obj)


def check_state_dict(state_dict: dict, source: str | os.PathLike = "state dict") -> None:
    """Raise CheckpointError naming every missing or unexpected key and every wrong shape."""
    with torch.device("meta"):  # shapes only: no memory, no random init
        expected = SVHNModel().state_dict()
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        problems.append(f"{len(missing)} missing keys ({_some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_some(unexpected)})")
    for key, value in expected.items():
        if key in state_dict and tuple(state_dict[key].shape) != tuple(value.shape):
            problems.append(f"{key} has shape {tuple(state_dict[key].shape)}, expected {tuple(value.shape)}")
    if problems:
        raise CheckpointError(f"{source}: not the published SVHN network: " + "; ".join(problems))
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source}: NaN or Inf in {_some(bad)}")


def model_from_state_dict(state_dict: dict, source: str | os.PathLike = "state dict") -> SVHNModel:
    """The network with these weights (checked first), in eval mode, on CPU, in fp32."""
    check_state_dict(state_dict, source)
    model = SVHNModel()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}, strict=True)
    return model.eval()


def load_model(path: str | os.PathLike) -> SVHNModel:
    """The network with the checkpoint's weights, in eval mode, on CPU, in fp32."""
    return model_from_state_dict(load_state_dict(path), path)


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message, for a one-line error."""
    text = str(e).strip().splitlines()
    return text[0].split(". ")[0][:200] if text else type(e).__name__


def _some(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


# --------------------------------------------------------------------------------------------
# Finding the weights
# --------------------------------------------------------------------------------------------

MODEL_ID = "Genius-Society/svhn"
DOWNLOAD_HINT = (
    "pip install modelscope && modelscope download --model Genius-Society/svhn --include 'model-*.pth' --local_dir checkpoints"
    ", then pass --checkpoint checkpoints (or set SVHN_CHECKPOINT)"
)


def modelscope_cache_dirs() -> list[Path]:
    """Where the ModelScope SDK has kept this model over its versions."""
    root = Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope")).expanduser()
    owner, name = MODEL_ID.split("/")
    bases = [root, root / "hub"]
    dirs = []
    for base in bases:
        dirs += [base / owner / name, base / "models" / owner / name]
        dirs += sorted((base / "models" / f"{owner}--{name}" / "snapshots").glob("*"))
    return dirs


def find_checkpoint(explicit: str | None = None, download: bool = True) -> Path:
    """--checkpoint, else $SVHN_CHECKPOINT, else ./checkpoints, else the ModelScope cache, else a
    download with modelscope (not when SVHN_OFFLINE=1). Raises CheckpointError with the exact
    command to run when there is none."""
    for given, what in ((explicit, "--checkpoint"), (os.environ.get("SVHN_CHECKPOINT"), "SVHN_CHECKPOINT")):
        if given:
            path = Path(given).expanduser()
            if not path.exists():
                raise CheckpointError(f"{path}: no such file or folder (given by {what})")
            return checkpoint_in_dir(path) if path.is_dir() else path
    here = Path(__file__).resolve().parent
    for folder in [Path.cwd() / "checkpoints", here / "checkpoints", *modelscope_cache_dirs()]:
        if folder.is_dir():
            try:
                return checkpoint_in_dir(folder)
            except CheckpointError:
                continue
    if download and os.environ.get("SVHN_OFFLINE", "") in ("", "0"):
        return _download()
    raise CheckpointError(f"no checkpoint found; download the published weights: {DOWNLOAD_HINT}")


def _download() -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise CheckpointError(f"no checkpoint found and modelscope is not installed; {DOWNLOAD_HINT}") from None
    try:  # fail fast offline instead of waiting through the SDK's retries
        socket.getaddrinfo("modelscope.cn", 443)
    except OSError:
        raise CheckpointError(
            f"no checkpoint found and modelscope.cn cannot be reached; on a machine with a network: {DOWNLOAD_HINT}"
        ) from None
    try:
        folder = snapshot_download(MODEL_ID, allow_patterns=["model-*.pth"])
    except Exception as e:  # the SDK raises many kinds; all mean "no weights"
        raise CheckpointError(f"downloading {MODEL_ID} failed ({_first_line(e)}); {DOWNLOAD_HINT}") from None
    return checkpoint_in_dir(Path(folder))


# --------------------------------------------------------------------------------------------
# The inference form: BatchNorm folded into the convolutions, dropout gone, heads merged
# --------------------------------------------------------------------------------------------


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
            conv, bn, _, pool = block[0], block[1], block[2], block[3]
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


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())



class PackedCpuNet(nn.Module):
    """InferenceNet with its weights packed once for oneDNN, the x86 CPU path.

    Convolution weights are reordered into oneDNN's blocked layout at build time instead of at
    every call, and each convolution runs with its ReLU fused (the kernels torch.compile's
    freezing pass uses, without the compile); the fully connected layers run as oneDNN inner
    products, which stream the 150 MB of fc weights faster than BLAS's matrix-vector product at
    batch 1. Activations are channels_last between the layers.
    """

    def __init__(self, net: InferenceNet) -> None:
        super().__init__()
        self.convs = []
        shape = [1, CHANNELS[0], INPUT_SIZE, INPUT_SIZE]
        layers = list(net.features)
        for conv, pool in zip(layers[0::3], layers[2::3]):
            w = torch._C._nn.mkldnn_reorder_conv2d_weight(
                conv.weight.detach().to_mkldnn(), conv.padding, conv.stride, conv.dilation, conv.groups, shape
            )
            self.convs.append((w, conv.bias.detach(), conv.padding, conv.stride, conv.dilation, pool))
            side = (shape[2] + 2 * pool.padding - pool.kernel_size) // pool.stride + 1
            shape = [1, conv.out_channels, side, side]
        self.linears = [
            (lin.weight.detach().to_mkldnn(), lin.bias.detach().to_mkldnn())
            for lin in (net.fc[0], net.fc[2], net.heads)
        ]
        self.eval()

    @staticmethod
    def available() -> bool:
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.contiguous(memory_format=torch.channels_last)
        for w, b, padding, stride, dilation, pool in self.convs:
            x = pool(torch.ops.mkldnn._convolution_pointwise(x, w, b, padding, stride, dilation, 1, "relu", [], ""))
        x = torch.flatten(x, 1).to_mkldnn()  # flatten() gives NCHW order, as in the original
        for i, (w, b) in enumerate(self.linears):
            x = torch._C._nn.mkldnn_linear(x, w, b)
            if i < len(self.linears) - 1:
                x = torch.relu_(x)
        return torch.split(x.to_dense(), HEAD_CLASSES, dim=1)


# --------------------------------------------------------------------------------------------
# The fast inference path, one object for every caller (inference.py and the evaluation scripts)
# --------------------------------------------------------------------------------------------


class Recognizer:
    """The network prepared once for one device and dtype; batches in, logits or Readings out.

    fold=True (the default) runs InferenceNet: BatchNorm folded, heads merged, dropout gone;
    on the CPU in fp32 its oneDNN-packed form. fold=False runs the published module as it is,
    for comparison. channels_last defaults to on for CPU and CUDA, off for the NPU, whose
    kernels choose their own internal layouts. compile=True asks for graph mode.
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
    ) -> None:
        from device import compile_module  # the device layer, kept out of the network's import

        self.device = torch.device(device)
        self.dtype = dtype
        self.notes: list[str] = []
        packed = fold and self.device.type == "cpu" and dtype == torch.float32 and not compile
        packed = packed and channels_last is not False and PackedCpuNet.available()
        if packed:
            net: nn.Module = PackedCpuNet(InferenceNet(model))
            self.channels_last, kernels = True, "onednn-packed"
        else:
            net = InferenceNet(model) if fold else copy.deepcopy(model).eval()
            self.channels_last = (self.device.type != "npu") if channels_last is None else channels_last
            net = net.to(device=self.device, dtype=dtype)
            if self.channels_last:
                net = net.to(memory_format=torch.channels_last)
            kernels = "eager"
        self.graph = "eager"
        if compile:
            net, self.graph = compile_module(net, self.device, self.notes)
        self.net = net
        self.settings = {
            "folded_batchnorm": fold,
            "kernels": kernels,
            "memory_format": "channels_last" if self.channels_last else "nchw",
            "dtype": str(dtype).replace("torch.", ""),
            "graph_mode": self.graph,
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
