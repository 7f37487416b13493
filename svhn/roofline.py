"""What the CPU can do at best in fp32, measured, and timing that treats candidates alike.

The peak is the better rate of two kernels that run at full speed: a 2048^3 sgemm (torch.mm,
BLAS) and oneDNN's convolution on the network's largest convolution (channels_last, batch 16).
On some CPUs one is faster, on others the other; a rate that our network beats is no limit.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from model import conv_layers
from svhn.devices import DeviceTimer


def largest_conv() -> dict:
    """The network's convolution with the most FLOPs: its input side, channels and FLOPs."""
    return max(conv_layers(), key=lambda layer: layer["flops"])


def peak_kernels() -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (a call, the FLOPs it does)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    conv = largest_conv()
    x = torch.randn(16, conv["cin"], conv["side"], conv["side"]).contiguous(memory_format=torch.channels_last)
    w = torch.randn(conv["cout"], conv["cin"], 5, 5).contiguous(memory_format=torch.channels_last)
    return {
        "sgemm": (lambda: torch.mm(a, b), 2 * 2048**3),
        "conv": (lambda: F.conv2d(x, w, padding=2), 16 * conv["flops"]),
    }


def interleaved_medians(fns: dict[str, Callable[[], object]], runs: int, rounds: int = 5) -> dict[str, float]:
    """Median seconds of each fn, timed in alternating rounds so that a noisy machine slows
    every candidate alike."""
    timer = DeviceTimer(torch.device("cpu"))
    times: dict = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()  # warm
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name] += [timer(fn) for _ in range(max(1, runs // rounds))]
    return {name: float(np.median(t)) for name, t in times.items()}


def peak_rates(medians: dict[str, float], kernels: dict[str, tuple[Callable, int]]) -> dict:
    """GFLOP/s of each peak kernel from its median time, and the peak (the best)."""
    rates = {f"{name}_gflops": flops / medians[name] / 1e9 for name, (_, flops) in kernels.items()}
    conv = largest_conv()
    return {**rates, "largest_conv": {k: conv[k] for k in ("side", "cin", "cout")}, "fp32_peak_gflops": max(rates.values())}


def fp32_peak(runs: int = 10) -> dict:
    kernels = peak_kernels()
    return peak_rates(interleaved_medians({name: fn for name, (fn, _) in kernels.items()}, runs), kernels)
