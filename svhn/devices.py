"""Devices: CPU, and every accelerator (Ascend NPU, CUDA) through one code path.

Accelerators are driven through `torch.get_device_module(device)` (torch.npu once torch_npu is
imported, torch.cuda otherwise): the same calls synchronise, count memory, record events and
choose the fp32 mode on both, so what is tested on CUDA covers the NPU path too. torch_npu is
imported only when an NPU is asked for or probed, and every way its import fails is turned into
a sentence a user can act on.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Callable

import torch

from svhn.exits import UserError

from svhn.text import one_line

CANN_ENV = "source /usr/local/Ascend/ascend-toolkit/set_env.sh"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FP32_MODES = ("default", "strict", "fast")


class DeviceError(UserError):
    """A device that cannot be used; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# torch_npu
# --------------------------------------------------------------------------------------------


# The CANN libraries torch_npu's extension links against (readelf -d on torch_npu 2.13.0's
# _C and lib/libtorch_npu.so); each is found through LD_LIBRARY_PATH, which set_env.sh sets.
CANN_LIBRARIES = ("libascendcl.so", "libhccl.so", "libacl_op_compiler.so", "libge_runner.so", "libgraph.so")


def _torch_npu_problem() -> str | None:
    """Why torch_npu cannot be imported, found without importing it, or None when it looks usable."""
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed: pip install torch-npu==<the version that pairs with your torch> (see README, 'Ascend set-up')"
    try:
        npu_version = importlib.metadata.version("torch_npu")
    except importlib.metadata.PackageNotFoundError:
        npu_version = None
    if npu_version and release(npu_version) != release(torch.__version__):
        return (
            f"torch_npu {npu_version} pairs with torch {release(npu_version)}, but torch {torch.__version__} "
            f"is installed: install torch {release(npu_version)} (x86_64: torch=={release(npu_version)}+cpu from "
            "PyTorch's CPU wheel index), or the torch-npu release for your torch (README, 'Ascend set-up')"
        )
    for lib in CANN_LIBRARIES:
        try:
            ctypes.CDLL(lib)
        except OSError:
            return f"CANN is not set up ({lib} cannot be loaded): run `{CANN_ENV}` (or the set_env.sh of your CANN install) first"
    return None


def release(version: str) -> str:
    """'2.6.0.post3' and '2.6.0+cpu' both pair as '2.6.0'."""
    m = re.match(r"(\d+\.\d+(?:\.\d+)?)", version)
    return m.group(1) if m else version


def import_torch_npu():
    """Import torch_npu or raise DeviceError saying why not."""
    if "torch_npu" in sys.modules:
        return sys.modules["torch_npu"]
    problem = _torch_npu_problem()
    if problem:
        raise DeviceError(problem)
    captured = StringIO()  # torch_npu prints its own warnings and tracebacks while it fails
    try:
        with redirect_stderr(captured), redirect_stdout(captured):
            return importlib.import_module("torch_npu")
    except (Exception, SystemExit) as e:  # any failure of a third-party import means "no NPU"
        raise DeviceError(
            f"torch_npu failed to import ({type(e).__name__}: {one_line(e, 160)}): check that CANN is set up "
            f"(`{CANN_ENV}`) and that torch_npu pairs with torch {torch.__version__} (README, 'Ascend set-up')"
        ) from None


# --------------------------------------------------------------------------------------------
# Choosing the device
# --------------------------------------------------------------------------------------------


def resolve(spec: str = "auto", notes: list[str] | None = None) -> torch.device:
    """auto | cpu | npu | npu:N | cuda | cuda:N  ->  a usable torch.device (made current).

    auto takes an NPU when torch_npu imports and sees one, else CUDA, else the CPU; when an
    installed torch_npu cannot be used, the reason is appended to `notes`.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        if importlib.util.find_spec("torch_npu") is not None:
            try:
                return resolve("npu")
            except DeviceError as e:
                if notes is not None:
                    notes.append(f"no NPU used: {e}")
        if torch.cuda.is_available():
            return resolve("cuda")
        return torch.device("cpu")
    m = re.fullmatch(r"(cpu|npu|cuda)(?::(\d+))?", spec)
    if not m:
        raise DeviceError(f"unknown device '{spec}': use auto, cpu, npu, npu:N, cuda or cuda:N")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise DeviceError(f"unknown device '{spec}': the CPU is just 'cpu'")
        return torch.device("cpu")
    if kind == "npu":
        import_torch_npu()
    elif not torch.backends.cuda.is_built():
        raise DeviceError(f"this torch ({torch.__version__}) was built without CUDA; install a CUDA build of torch")
    mod = torch.get_device_module(kind)
    count = mod.device_count() if mod.is_available() else 0
    if count == 0:
        raise DeviceError(f"no {kind.upper()} device is visible (check the driver, and {_visible_env(kind)})")
    i = int(index) if index is not None else mod.current_device()
    if i >= count:
        raise DeviceError(f"device {kind}:{i} does not exist: {count} {kind.upper()} device{'s' if count > 1 else ''} visible ({kind}:0 to {kind}:{count - 1})")
    mod.set_device(i)
    return torch.device(kind, i)


def _visible_env(kind: str) -> str:
    return "ASCEND_RT_VISIBLE_DEVICES" if kind == "npu" else "CUDA_VISIBLE_DEVICES"


def accelerator(device: torch.device):
    """torch.npu / torch.cuda for an accelerator, None for the CPU."""
    return None if device.type == "cpu" else torch.get_device_module(device.type)


def default_channels_last(device: torch.device, asked: bool | None = None) -> bool:
    """NHWC activations unless asked otherwise: on for CPU and CUDA, whose convolutions are
    fastest in it; off for the NPU, whose kernels choose their own layouts."""
    return (device.type != "npu") if asked is None else asked


def synchronize(device: torch.device) -> None:
    mod = accelerator(device)
    if mod is not None:
        mod.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    mod = accelerator(device)
    if mod is not None:
        mod.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated on the device since the last reset; None on the CPU."""
    mod = accelerator(device)
    return None if mod is None else int(mod.max_memory_allocated(device))


def device_name(device: torch.device) -> str:
    mod = accelerator(device)
    return cpu_model() if mod is None else str(mod.get_device_name(device))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------
# fp32 mode: TF32 (CUDA) and HF32 (Ascend) are the same idea under two names
# --------------------------------------------------------------------------------------------


class Fp32Switch:
    """One reduced-precision switch for fp32 work ('conv' or 'matmul') on one device type."""

    def __init__(self, reduced: str, get: Callable[[], bool], set: Callable[[bool], None]) -> None:
        self.reduced, self.get, self.set = reduced, get, set


def _precision_switch(chain: list[object]) -> Fp32Switch:
    """torch >= 2.9's fp32_precision settings: the first object's own value, else its parents'
    ('none' means inherit); 'none' all the way up is the old default, given by the last entry."""
    *objects, default = chain

    def get() -> bool:
        for obj in objects:
            value = getattr(obj, "fp32_precision", "none")
            if value != "none":
                return value == "tf32"
        return default

    def set(on: bool) -> None:
        objects[0].fp32_precision = "tf32" if on else "ieee"

    return Fp32Switch("tf32", get, set)


def _flag_switch(obj: object, attr: str, reduced: str) -> Fp32Switch:
    return Fp32Switch(reduced, lambda: bool(getattr(obj, attr)), lambda on: setattr(obj, attr, on))


def cuda_fp32_switches() -> dict[str, Fp32Switch]:
    """TF32 switches for CUDA: the fp32_precision API where torch has it (the old allow_tf32
    flags warn there, and reading them raises once anything used the new API), else the flags."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return {
            "conv": _precision_switch([torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends, True]),
            "matmul": _precision_switch([torch.backends.cuda.matmul, torch.backends, False]),
        }
    return {
        "conv": _flag_switch(torch.backends.cudnn, "allow_tf32", "tf32"),
        "matmul": _flag_switch(torch.backends.cuda.matmul, "allow_tf32", "tf32"),
    }


def fp32_switches(device: torch.device) -> dict[str, Fp32Switch]:
    """op kind -> switch, for the reduced fp32 formats this device really has (none on the CPU,
    none on CUDA GPUs before Ampere, which have no TF32)."""
    if device.type == "cuda":
        return cuda_fp32_switches() if torch.cuda.get_device_capability(device) >= (8, 0) else {}
    mod = accelerator(device)
    if mod is not None and hasattr(mod, "conv") and hasattr(mod, "matmul"):
        return {"conv": _flag_switch(mod.conv, "allow_hf32", "hf32"), "matmul": _flag_switch(mod.matmul, "allow_hf32", "hf32")}
    return {}


def apply_fp32_mode(switches: dict[str, Fp32Switch], mode: str = "default") -> dict[str, str]:
    """default: the device's own defaults (CUDA and Ascend convolutions in TF32/HF32, matrix
    products in IEEE fp32); strict: IEEE fp32 everywhere; fast: TF32/HF32 everywhere.
    Returns what is now in effect, e.g. {"conv": "hf32", "matmul": "ieee"}."""
    if mode not in FP32_MODES:
        raise DeviceError(f"unknown fp32 mode '{mode}': use {', '.join(FP32_MODES)}")
    if mode != "default":
        for switch in switches.values():
            switch.set(mode == "fast")
    return {kind: (switches[kind].reduced if kind in switches and switches[kind].get() else "ieee") for kind in ("conv", "matmul")}


def set_fp32_mode(device: torch.device, mode: str = "default") -> dict[str, str]:
    return apply_fp32_mode(fp32_switches(device), mode)


# --------------------------------------------------------------------------------------------
# Graph mode
# --------------------------------------------------------------------------------------------


def compile_module(module: torch.nn.Module, device: torch.device, example: torch.Tensor) -> tuple[torch.nn.Module, str]:
    """Graph capture where the device has it: npugraph_ex or torchair on Ascend, torch.compile
    with CUDA graphs on CUDA, torch.compile with frozen weights on the CPU.

    torch.compile is lazy: a backend fails at the first call, not here. So the compiled module is
    called once on `example` (a prepared batch) before it is returned. Inductor options go to this
    one compile (options=), never into the process-wide config. Raises DeviceError with the reason
    when graph mode cannot be had; the caller runs eager."""
    try:
        if device.type == "npu":
            if "npugraph_ex" in torch._dynamo.list_backends(exclude_tags=()):
                compiled, mode = torch.compile(module, backend="npugraph_ex", dynamic=False), "npugraph_ex"
            else:
                import torchair

                backend = torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
                compiled, mode = torch.compile(module, backend=backend, dynamic=False), "torchair"
        elif device.type == "cuda":
            compiled, mode = torch.compile(module, dynamic=False, options={"triton.cudagraphs": True}), "torch.compile+cudagraphs"
        else:
            # frozen weights become constants, which inductor prepacks for oneDNN
            compiled, mode = torch.compile(module, dynamic=False, options={"freezing": True}), "torch.compile(freezing)"
        with torch.inference_mode():
            compiled(example)
        synchronize(device)
        return compiled, mode
    except Exception as e:  # no torchair, no C++ compiler, a backend bug: eager still works
        raise DeviceError(f"graph mode failed on {device} ({type(e).__name__}: {one_line(e, 160)}); running eager") from None


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


class DeviceTimer:
    """Times one call on a device, the device synchronised around it.

    On accelerators the time is read from device events (torch.npu.Event / torch.cuda.Event),
    which measure the device's own work; on the CPU from perf_counter.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mod = accelerator(device)

    def __call__(self, fn: Callable[[], object]) -> float:
        """Seconds that fn() took."""
        if self.mod is None:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        self.mod.synchronize(self.device)
        begin = self.mod.Event(enable_timing=True)
        end = self.mod.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3


# --------------------------------------------------------------------------------------------
# What ran where
# --------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    """Versions and machine facts for a report."""
    env = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    if device.type == "npu":
        npu = sys.modules.get("torch_npu")
        env["torch_npu"] = getattr(npu, "__version__", None)
        env["cann"] = cann_version()
    return env


def cann_version(roots: list[str | os.PathLike] | None = None) -> str | None:
    """The CANN release (e.g. '8.0.0', '8.1.RC1'), not a component's version.

    torch_npu's own get_cann_version() when torch_npu is loaded and knows it (it returns '' for
    CANN < 8.1.RC1); else the `version=` line of the toolkit's ascend_toolkit_install.info, which
    CANN writes at <toolkit>/latest/<arch>-linux/ (and some releases at the toolkit's top)."""
    npu = sys.modules.get("torch_npu")
    getter = getattr(getattr(npu, "npu", None), "get_cann_version", None) if npu else None
    if getter is not None:
        try:
            found = getter()
        except Exception:  # an old torch_npu, or no driver: the file below still tells
            found = ""
        if found:
            return str(found)
    if roots is None:
        roots = [os.environ.get("ASCEND_TOOLKIT_HOME"), os.environ.get("ASCEND_HOME_PATH"), "/usr/local/Ascend/ascend-toolkit/latest"]
    for root in filter(None, roots):
        root = Path(root)
        for info in [root / "ascend_toolkit_install.info", *sorted(root.glob("*-linux/ascend_toolkit_install.info"))]:
            try:
                text = info.read_text(errors="replace")
            except OSError:
                continue
            m = re.search(r"^\s*version\s*=\s*(\S+)", text, re.MULTILINE)
            if m:
                return m.group(1)
    return None
