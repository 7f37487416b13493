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

CANN_ENV = "source /usr/local/Ascend/ascend-toolkit/set_env.sh"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FP32_MODES = ("default", "strict", "fast")


class DeviceError(Exception):
    """A device that cannot be used; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# torch_npu
# --------------------------------------------------------------------------------------------


def _torch_npu_problem() -> str | None:
    """Why torch_npu cannot be imported, found without importing it (its import prints a
    traceback and exits the process when CANN is missing), or None when it looks usable."""
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed: pip install torch-npu==<the version that pairs with your torch> (see README, 'Ascend set-up')"
    try:
        npu_version = importlib.metadata.version("torch_npu")
    except importlib.metadata.PackageNotFoundError:
        npu_version = None
    if npu_version and _release(npu_version) != _release(torch.__version__):
        return (
            f"torch_npu {npu_version} pairs with torch {_release(npu_version)}, but torch {torch.__version__} "
            f"is installed: pip install torch=={_release(npu_version)} (or the torch-npu release for your torch)"
        )
    for lib in ("libascendcl.so", "libhccl.so"):
        try:
            ctypes.CDLL(lib)
        except OSError:
            return f"CANN is not set up ({lib} cannot be loaded): run `{CANN_ENV}` (or the set_env.sh of your CANN install) first"
    return None


def _release(version: str) -> str:
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
    captured = StringIO()
    try:
        with redirect_stderr(captured), redirect_stdout(captured):
            return importlib.import_module("torch_npu")
    except SystemExit:  # torch_npu exits after printing its own traceback when CANN is missing
        raise DeviceError(f"torch_npu could not start, CANN is not set up: run `{CANN_ENV}` first") from None
    except Exception as e:
        text = str(e)
        if "undefined symbol" in text:
            raise DeviceError(
                f"torch_npu was built for another torch than {torch.__version__} ({text.splitlines()[0][:120]}): "
                "install the torch and torch-npu versions that pair (README, 'Ascend set-up')"
            ) from None
        if ".so" in text:
            raise DeviceError(f"torch_npu could not load a CANN library ({text.splitlines()[0][:120]}): run `{CANN_ENV}` first") from None
        raise DeviceError(f"torch_npu failed to import: {type(e).__name__}: {text.splitlines()[0][:200] if text else ''}") from None


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


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype '{name}': use {', '.join(DTYPES)}")
    return DTYPES[name]


def accelerator(device: torch.device):
    """torch.npu / torch.cuda for an accelerator, None for the CPU."""
    return None if device.type == "cpu" else torch.get_device_module(device.type)


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


def _fp32_switches(device: torch.device) -> dict[str, tuple[object, str, str]]:
    """op kind -> (object, attribute, name of the reduced format) for this device's switches."""
    if device.type == "cuda":
        return {
            "conv": (torch.backends.cudnn, "allow_tf32", "tf32"),
            "matmul": (torch.backends.cuda.matmul, "allow_tf32", "tf32"),
        }
    mod = accelerator(device)
    if mod is not None and hasattr(mod, "conv") and hasattr(mod, "matmul"):
        return {"conv": (mod.conv, "allow_hf32", "hf32"), "matmul": (mod.matmul, "allow_hf32", "hf32")}
    return {}


def set_fp32_mode(device: torch.device, mode: str = "default") -> dict[str, str]:
    """default: the device's own defaults (CUDA and Ascend convolutions in TF32/HF32, matrix
    products in IEEE fp32); strict: IEEE fp32 everywhere; fast: TF32/HF32 everywhere.
    Returns what is now in effect, e.g. {"conv": "hf32", "matmul": "ieee"}."""
    if mode not in FP32_MODES:
        raise DeviceError(f"unknown fp32 mode '{mode}': use {', '.join(FP32_MODES)}")
    switches = _fp32_switches(device)
    if mode != "default":
        for obj, attr, _ in switches.values():
            setattr(obj, attr, mode == "fast")
    return fp32_mode(device)


def fp32_mode(device: torch.device) -> dict[str, str]:
    switches = _fp32_switches(device)
    if not switches:
        return {"conv": "ieee", "matmul": "ieee"}
    return {kind: (name if getattr(obj, attr) else "ieee") for kind, (obj, attr, name) in switches.items()}


# --------------------------------------------------------------------------------------------
# Graph mode
# --------------------------------------------------------------------------------------------


def compile_module(module: torch.nn.Module, device: torch.device, notes: list[str]) -> tuple[torch.nn.Module, str]:
    """Graph capture where the device has it: torchair / npugraph_ex on Ascend, torch.compile
    with CUDA graphs on CUDA, torch.compile with frozen weights on the CPU. Returns the module
    and the graph mode used; falls back to eager with a note where capture is not available."""
    try:
        if device.type == "npu":
            if "npugraph_ex" in torch._dynamo.list_backends(exclude_tags=()):
                return torch.compile(module, backend="npugraph_ex", dynamic=False), "npugraph_ex"
            import torchair

            backend = torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
            return torch.compile(module, backend=backend, dynamic=False), "torchair"
        if device.type == "cuda":
            return torch.compile(module, mode="reduce-overhead", dynamic=False), "torch.compile+cudagraphs"
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights become constants: prepacked for oneDNN
        return torch.compile(module, dynamic=False), "torch.compile(freezing)"
    except Exception as e:  # no torchair, no compiler backend: eager still works
        notes.append(f"graph mode not available on {device} ({type(e).__name__}: {str(e)[:120]}); running eager")
        return module, "eager"


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


def cann_version() -> str | None:
    roots = [os.environ.get("ASCEND_TOOLKIT_HOME"), os.environ.get("ASCEND_HOME_PATH"), "/usr/local/Ascend/ascend-toolkit/latest"]
    for root in filter(None, roots):
        for name in ("version.cfg", "compiler/version.info", "runtime/version.info"):
            try:
                text = (Path(root) / name).read_text()
            except OSError:
                continue
            m = re.search(r"(?:^|\n)\s*(?:version|Version)\s*=\s*([^\s\]]+)", text)
            if m:
                return m.group(1)
    return None
