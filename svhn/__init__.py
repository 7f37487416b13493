"""The library under the scripts: checkpoints, devices, images, labels, the inference form of the
network, deviation statistics and the command-line plumbing, one module each.

Importing this package first keeps torch_npu from loading itself at `import torch`. torch >= 2.5
imports every installed `torch.backends` plug-in at the end of `torch/__init__.py`, torch_npu
(>= 2.5.1) is one, and on a host where CANN is not set up (or torch and torch_npu do not pair)
that import fails and takes `import torch` with it, before any script can say why. The device
layer (svhn.devices) imports torch_npu itself, only when an NPU is asked for or probed, and
turns each failure into one line. A user who sets TORCH_DEVICE_BACKEND_AUTOLOAD keeps their choice.
"""

import os
import signal
import sys
import threading

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

# Ctrl-C while torch loads: a KeyboardInterrupt raised inside torch's C++ initialisation aborts
# the process (pybind11 cannot carry it), so during the import a Ctrl-C is only noted, and acted
# on once torch is loaded.
_interrupted: list[int] = []
_main_thread = threading.current_thread() is threading.main_thread()
_previous = signal.signal(signal.SIGINT, lambda number, frame: _interrupted.append(number)) if _main_thread else None
try:
    import torch  # noqa: F401  (imported here, once, under the setting above)
except RuntimeError as e:  # TORCH_DEVICE_BACKEND_AUTOLOAD=1 and a plug-in (torch_npu) failed
    cause = e.__cause__ or e
    print(
        f"error: import torch failed, a device plug-in did not load ({type(cause).__name__}: "
        f"{str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ''}); "
        "unset TORCH_DEVICE_BACKEND_AUTOLOAD (this tool loads torch_npu itself for --device npu), "
        "or set up CANN first: source /usr/local/Ascend/ascend-toolkit/set_env.sh",
        file=sys.stderr,
    )
    sys.exit(2)
finally:
    if _main_thread:
        signal.signal(signal.SIGINT, _previous)
if _interrupted:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
