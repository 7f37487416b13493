"""A network as an ONNX file: writing it (for Ascend's ATC/OM path and ONNX Runtime), checking
what was written, and running it with ONNX Runtime as one more target of the existing tools.
Which network is a NetworkSpec (svhn.network): its input size and named outputs.

The exporter is torch's TorchScript-based one (torch.onnx.export(dynamo=False)): it is in every
torch this project supports (2.6 and later), needs no onnxscript, and writes opset 11, which
every CANN from 6.0 to 8.x accepts; the torch.export-based exporter starts at opset 18.
"""

from __future__ import annotations

import collections
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from torch import nn

from svhn.exits import UserError

from svhn.files import write_bytes_atomic
from svhn.network import NetworkSpec
from svhn.text import one_line, printable

INPUT_NAME = "image"
DEFAULT_OPSET = 11  # CANN 6.0 accepts 9-13, CANN 7.0 and 8.x 9-18
OPSETS = range(9, 19)
# The operators ATC converts (CANN's ONNX operator list) among those these networks can need.
ATC_OPS = {"Conv", "Relu", "MaxPool", "Gemm", "MatMul", "Add", "Mul", "Sigmoid", "Concat", "Resize", "Upsample", "BatchNormalization",
           "Flatten", "Reshape", "Split", "Slice", "Identity", "Constant", "Transpose"}
# Operators whose result follows the batch size at run time: none may remain at a fixed batch.
BATCH_DEPENDENT_OPS = {"Shape", "Size", "ConstantOfShape", "Expand", "Range", "NonZero", "Tile", "Gather"}
PROVIDERS = ("CANNExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxError(UserError):
    """An ONNX file or tool that cannot be used; the message says why in one line."""


def require(name: str):
    """Import onnx or onnxruntime, or say how to install them."""
    try:
        return __import__(name)
    except ImportError:
        raise OnnxError(f"{name} is not installed: pip install -r requirements-export.txt (onnx and onnxruntime)") from None


def check_opset(opset: int) -> None:
    if opset not in OPSETS:
        raise OnnxError(f"opset {opset} is out of range: ATC accepts ONNX opsets {OPSETS.start} to {OPSETS.stop - 1} (CANN 6.0: 9 to 13)")


def export(net: nn.Module, spec: NetworkSpec, path: str | os.PathLike, batch: int | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """Write `net` (the network's inference form) to `path`: input `image` (N x 3 x H x W float32,
    already normalised), the spec's outputs by name; N fixed when batch is given, else a dynamic
    axis. Exported to memory, then written atomically: a failed export leaves no file."""
    check_opset(opset)
    example = torch.zeros(spec.input_shape(batch or 1))
    axes = None if batch else {name: {0: "batch"} for name in (INPUT_NAME, *spec.output_names)}
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the exporter announces its own deprecation; we chose it on purpose
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (example,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=list(spec.output_names), dynamic_axes=axes, do_constant_folding=True)
    return write_bytes_atomic(path, buf.getvalue())


def inspect(path: str | os.PathLike) -> dict:
    """What the file holds: the checker's verdict, opset, the input and output shapes, the op
    histogram, operators ATC does not list, and batch-dependent operators."""
    onnx = require("onnx")
    if not Path(path).is_file():
        raise OnnxError(f"{printable(path)}: no such ONNX file (write one with: python export.py --output {printable(path)})")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # a file that is not ONNX, or a model that fails the checker
        raise OnnxError(f"{printable(path)}: the ONNX checker refuses it ({type(e).__name__}: {one_line(e, 160)})") from None

    def shape(value) -> list:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]

    ops = collections.Counter(node.op_type for node in proto.graph.node)
    inputs = {v.name: shape(v) for v in proto.graph.input}
    batch = inputs.get(INPUT_NAME, [None])[0]
    return {
        "path": str(path),
        "checker": "passed",
        "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": inputs,
        "outputs": {v.name: shape(v) for v in proto.graph.output},
        "batch": batch if isinstance(batch, int) and batch > 0 else "dynamic",
        "op_histogram": dict(sorted(ops.items())),
        "ops_not_on_atc_list": sorted(set(ops) - ATC_OPS),
        "batch_dependent_ops": sorted(set(ops) & BATCH_DEPENDENT_OPS),
    }


def problems(info: dict, spec: NetworkSpec) -> list[str]:
    """What makes an exported file unfit for ATC or for this project's callers of `spec`'s network."""
    found = []
    h, w = spec.input_size
    if list(info["inputs"]) != [INPUT_NAME] or info["inputs"][INPUT_NAME][1:] != [3, h, w]:
        found.append(f"input should be {INPUT_NAME} N x 3 x {h} x {w}, is {info['inputs']}")
    if [(name, tuple(shape[1:])) for name, shape in info["outputs"].items()] != list(spec.outputs):
        found.append(f"outputs should be {', '.join(f'{n} N x {tuple(s)}' for n, s in spec.outputs)}, are {info['outputs']}")
    if info["ops_not_on_atc_list"]:
        found.append(f"operators ATC does not list: {', '.join(info['ops_not_on_atc_list'])}")
    if info["batch"] != "dynamic" and info["batch_dependent_ops"]:
        found.append(f"batch-dependent operators at a fixed batch: {', '.join(info['batch_dependent_ops'])}")
    return found


def spec_of(info: dict, specs: list[NetworkSpec]) -> NetworkSpec:
    """Which of these networks an inspected file holds, by its output names."""
    for spec in specs:
        if list(info["outputs"]) == list(spec.output_names):
            return spec
    raise OnnxError(f"{printable(info['path'])}: outputs {', '.join(info['outputs'])} are none of this project's networks' "
                    f"({'; '.join(', '.join(s.output_names) for s in specs)})")


class OnnxNet:
    """An ONNX file run by ONNX Runtime, a svhn.network.Runnable (prepare, run, outputs, spec,
    dtype, device, settings), so every tool takes it as one more target. The spec is the one of
    `specs` whose outputs the file names.

    The execution provider is the first installed of CANN (onnxruntime-cann), CUDA and CPU, or
    the one asked for. A fixed-batch file gets batches of its own size (the last one padded).
    """

    def __init__(self, path: str | os.PathLike, specs: list[NetworkSpec], provider: str | None = None) -> None:
        ort = require("onnxruntime")
        available = ort.get_available_providers()
        if provider is not None and provider not in available:
            raise OnnxError(f"ONNX Runtime has no {provider} here (installed: {', '.join(available)})")
        self.provider = provider or next(p for p in PROVIDERS if p in available)
        info = inspect(path)
        self.spec = spec_of(info, specs)
        self.batch = info["batch"] if isinstance(info["batch"], int) else None
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # ORT's threads spin after each run and would steal the cores from torch when both run
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=[self.provider])
        except Exception as e:
            raise OnnxError(f"{printable(path)}: ONNX Runtime cannot load it ({type(e).__name__}: {one_line(e, 160)})") from None
        self.path = Path(path)
        self.dtype = torch.float32
        self.device = torch.device("cpu")  # where its inputs and outputs live; the provider says where it runs
        self.settings = {
            "runtime": f"onnxruntime {ort.__version__}",
            "provider": self.provider,
            "onnx_file": str(self.path),
            "batch": info["batch"],
            "opset": info["opset"],
            "kernels": f"onnxruntime {self.provider}",
            "memory_format": "nchw",
            "dtype": "float32",
            "graph_mode": "onnx",
            "folded_batchnorm": True,
        }

    def prepare(self, batch: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(batch.detach().float().cpu().numpy())

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        if self.batch is None:
            return self.session.run(None, {INPUT_NAME: x})
        chunks = []
        for start in range(0, x.shape[0], self.batch):
            part = x[start : start + self.batch]
            n = part.shape[0]
            if n < self.batch:
                part = np.concatenate([part, np.zeros((self.batch - n, *part.shape[1:]), dtype=part.dtype)])
            chunks.append([o[:n] for o in self.session.run(None, {INPUT_NAME: part})])
        return [np.concatenate([c[h] for c in chunks]) for h in range(len(self.spec.outputs))]

    def outputs(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in self.run(self.prepare(batch)))
