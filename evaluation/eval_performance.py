#!/usr/bin/env python3
"""Latency and throughput of the recognizer per device and batch size, and the CPU-vs-device speed-up.

    python evaluation/eval_performance.py                          # CPU and the accelerator, if any
    python evaluation/eval_performance.py --devices cpu npu --batch-sizes 1 4 8 16 64 --json perf.json
    python evaluation/eval_performance.py --devices cpu --cpu-roofline --vs-onnxruntime

Per device and batch size: the first call is timed alone (cold start: NPUs compile per shape),
then --warmup untimed calls, then --runs timed calls with the device synchronised around each
(device events on accelerators). The timed region is the forward pass on a batch already on the
device; `e2e` adds the copy in and the logits' copy back. --cpu-roofline measures the two CPU
targets (see README) in one run; --vs-onnxruntime times ONNX Runtime on the same network.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cli  # noqa: E402
import device as dev  # noqa: E402
from model import CheckpointError, InferenceNet, Recognizer, SVHNModel, find_checkpoint, flops_per_image  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("what to measure")
    group.add_argument("--devices", nargs="+", default=None, help="devices to measure (default: cpu and the accelerator, if any)")
    group.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8, 16], help="(default: %(default)s)")
    group.add_argument("--warmup", type=int, default=10, help="untimed calls per batch size after the cold one (default: %(default)s)")
    group.add_argument("--runs", type=int, default=50, help="timed calls per batch size (default: %(default)s)")
    group.add_argument("--cpu-roofline", action="store_true", help="measure the CPU targets: default path vs plain eager NCHW at batch 1, and vs the fp32 matmul limit at batch 16")
    group.add_argument("--vs-onnxruntime", action="store_true", help="also time ONNX Runtime (CPU) on the same network, when installed")
    cli.add_model_args(parser)
    group = cli.add_device_args(parser)
    group.set_defaults(device=None)
    parser.add_argument("--json", metavar="FILE", help="write every figure, the machine and the settings here")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.runs < 1 or args.warmup < 0:
        parser.error("batch sizes and --runs must be >= 1, --warmup >= 0")
    return args


def summary(seconds: list[float], batch_size: int) -> dict:
    ms = np.array(seconds) * 1e3
    return {
        "mean_ms": float(ms.mean()),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "min_ms": float(ms.min()),
        "std_ms": float(ms.std()),
        "images_per_s": batch_size / float(ms.mean() / 1e3),
    }


def measure_device(rec: Recognizer, batch_sizes: list[int], warmup: int, runs: int, bar: tqdm) -> list[dict]:
    """One row per batch size for one prepared recognizer."""
    timer = dev.DeviceTimer(rec.device)
    rows = []
    for bs in batch_sizes:
        bar.set_description(f"{rec.device} batch {bs}")
        cpu_batch = torch.rand(bs, 3, 54, 54) * 2 - 1
        x = rec.prepare(cpu_batch)
        dev.synchronize(rec.device)
        dev.reset_peak_memory(rec.device)
        cold = timer(lambda: rec.run(x))
        for _ in range(warmup):
            rec.run(x)
            bar.update()
        times = []
        for _ in range(runs):
            times.append(timer(lambda: rec.run(x)))
            bar.update()
        rec.logits(cpu_batch)  # the copy back's own first call
        e2e = [timer(lambda: rec.logits(cpu_batch)) for _ in range(max(1, runs // 5))]
        peak = dev.peak_memory(rec.device)
        rows.append(
            {
                "batch_size": bs,
                "cold_start_ms": cold * 1e3,
                **summary(times, bs),
                "e2e_mean_ms": float(np.mean(e2e) * 1e3),
                "peak_memory_mb": None if peak is None else peak / 2**20,
                "times_ms": [t * 1e3 for t in times],
            }
        )
    return rows


def interleaved_medians(fns: dict, runs: int, rounds: int = 5) -> dict:
    """Median seconds of each fn, timed in alternating rounds so that a noisy machine slows
    every candidate alike."""
    timer = dev.DeviceTimer(torch.device("cpu"))
    times: dict = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += [timer(fn) for _ in range(max(1, runs // rounds))]
    return {name: float(np.median(t)) for name, t in times.items()}


def cpu_roofline(model: SVHNModel, runs: int) -> dict:
    """The CPU targets, measured in one run: the default path's throughput against a plain eager
    NCHW fp32 forward at batch 1, and at batch 16 against the fp32 limit, i.e. the rate of a
    2048 x 2048 torch.mm divided by the network's FLOPs per image."""
    eager = Recognizer(model, "cpu", fold=False, channels_last=False)
    fast = Recognizer(model, "cpu")
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x1, x16 = torch.randn(1, 3, 54, 54), torch.randn(16, 3, 54, 54)
    med = interleaved_medians(
        {
            "eager_b1": lambda: eager.run(x1),
            "default_b1": lambda: fast.run(fast.prepare(x1)),
            "default_b16": lambda: fast.run(fast.prepare(x16)),
            "mm_2048": lambda: torch.mm(a, b),
        },
        runs,
    )
    mm_gflops = 2 * 2048**3 / med["mm_2048"] / 1e9
    limit = mm_gflops * 1e9 / flops_per_image()
    return {
        "eager_nchw_b1_images_per_s": 1 / med["eager_b1"],
        "default_b1_images_per_s": 1 / med["default_b1"],
        "default_b16_images_per_s": 16 / med["default_b16"],
        "mm_2048_gflops": mm_gflops,
        "fp32_limit_images_per_s": limit,
        "speedup_b1_vs_eager_nchw": med["eager_b1"] / med["default_b1"],
        "b16_fraction_of_fp32_limit": (16 / med["default_b16"]) / limit,
        "default_path": fast.settings,
        "statistic": "median of interleaved rounds",
    }


def onnxruntime_rows(model: SVHNModel, batch_sizes: list[int], warmup: int, runs: int) -> list[dict] | str:
    """ONNX Runtime on the CPU running the same (folded) network, beside our default CPU path."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime onnx)"
    net = InferenceNet(model)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net, (torch.randn(1, 3, 54, 54),), buf, dynamo=False, opset_version=17,
                input_names=["x"], output_names=[f"head{i}" for i in range(6)], dynamic_axes={"x": {0: "n"}},
            )
    except Exception as e:  # the exporter's needs (onnx, onnxscript) vary by torch version
        return f"ONNX export failed ({type(e).__name__}: {str(e)[:120]})"
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # ORT's threads spin after each run and would steal the cores from torch's turn.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
    ours = Recognizer(model, "cpu")
    rows = []
    for bs in batch_sizes:
        x = torch.rand(bs, 3, 54, 54) * 2 - 1
        feed = {"x": x.numpy()}
        for _ in range(warmup):
            session.run(None, feed)
        med = interleaved_medians({"ort": lambda: session.run(None, feed), "ours": lambda: ours.run(x)}, runs)
        rows.append(
            {
                "batch_size": bs,
                "onnxruntime_images_per_s": bs / med["ort"],
                "ours_images_per_s": bs / med["ours"],
                "ours_over_onnxruntime": med["ort"] / med["ours"],
                "onnxruntime": ort.__version__,
            }
        )
    return rows


def default_devices() -> list[str]:
    notes: list[str] = []
    accel = dev.resolve("auto", notes)
    for line in notes:
        cli.note(line)
    return ["cpu"] if accel.type == "cpu" else ["cpu", str(accel)]


def load_any_model(args: argparse.Namespace) -> tuple[SVHNModel, str]:
    """Speed does not depend on the weights: without a checkpoint, random ones are timed."""
    if not args.checkpoint:
        try:
            find_checkpoint(download=False)
        except CheckpointError:
            cli.note("no checkpoint found; timing random weights (speed does not depend on them)")
            torch.manual_seed(0)
            return SVHNModel().eval(), "random weights"
    model, path = cli.load_model_or_exit(args)
    return model, str(path)


def markdown(results: dict) -> str:
    out = []
    for entry in results["devices"]:
        s = entry["settings"]
        out.append(
            f"## {entry['device_name']} ({entry['device']}), {s['dtype']}, fp32 conv {entry['fp32_mode']['conv']} / "
            f"matmul {entry['fp32_mode']['matmul']}, {s['kernels']}, {s['memory_format']}, graph {s['graph_mode']}\n"
        )
        rows = [
            [r["batch_size"], f"{r['cold_start_ms']:.2f}", f"{r['mean_ms']:.2f}", f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}",
             f"{r['p99_ms']:.2f}", f"{r['images_per_s']:.1f}", f"{r['e2e_mean_ms']:.2f}",
             "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"]
            for r in entry["rows"]
        ]
        header = ["batch", "cold start ms", "mean ms", "P50 ms", "P95 ms", "P99 ms", "images/s", "e2e mean ms", "peak MB"]
        out.append(cli.markdown_table(header, rows) + "\n")
    if results.get("speedup"):
        out.append("## Speed-up over the CPU (same batch size, mean latency)\n")
        rows = [[s["device"], s["batch_size"], f"{s['cpu_mean_ms']:.2f}", f"{s['device_mean_ms']:.3f}", f"{s['speedup']:.1f}x"] for s in results["speedup"]]
        out.append(cli.markdown_table(["device", "batch", "CPU ms", "device ms", "speed-up"], rows) + "\n")
    if results.get("cpu_roofline"):
        r = results["cpu_roofline"]
        out.append("## CPU targets (one run, medians of interleaved rounds)\n")
        out.append(
            cli.markdown_table(
                ["measure", "value", "target"],
                [
                    ["plain eager NCHW fp32, batch 1", f"{r['eager_nchw_b1_images_per_s']:.1f} images/s", ""],
                    ["default path, batch 1", f"{r['default_b1_images_per_s']:.1f} images/s", ""],
                    ["speed-up at batch 1", f"{r['speedup_b1_vs_eager_nchw']:.2f}x", ">= 1.25x"],
                    ["fp32 matmul (2048^3)", f"{r['mm_2048_gflops']:.1f} GFLOP/s", ""],
                    ["fp32 limit (matmul rate / 1.587 GFLOP)", f"{r['fp32_limit_images_per_s']:.1f} images/s", ""],
                    ["default path, batch 16", f"{r['default_b16_images_per_s']:.1f} images/s", ""],
                    ["batch 16 against the limit", f"{100 * r['b16_fraction_of_fp32_limit']:.0f} %", ">= 85 %"],
                ],
            )
            + "\n"
        )
    ort_rows = results.get("onnxruntime")
    if isinstance(ort_rows, str):
        out.append(f"ONNX Runtime: {ort_rows}\n")
    elif ort_rows:
        out.append("## ONNX Runtime on the CPU, same network (medians of interleaved rounds)\n")
        rows = [[r["batch_size"], f"{r['onnxruntime_images_per_s']:.1f}", f"{r['ours_images_per_s']:.1f}", f"{r['ours_over_onnxruntime']:.2f}x"] for r in ort_rows]
        out.append(cli.markdown_table(["batch", "ONNX Runtime images/s", "ours images/s", "ours / ORT"], rows) + "\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, checkpoint = load_any_model(args)
    specs = args.devices or ([args.device] if args.device else default_devices())
    devices = [cli.device_or_exit(spec) for spec in specs]
    dtype = dev.DTYPES[args.dtype]
    results: dict = {
        "checkpoint": checkpoint,
        "settings": {"dtype": args.dtype, "warmup": args.warmup, "runs": args.runs, "batch_sizes": args.batch_sizes,
                     "timed_region": "forward on a batch already on the device, synchronised"},
        "machine": dev.environment(torch.device("cpu")),
        "devices": [],
    }
    steps = len(devices) * len(args.batch_sizes) * (args.warmup + args.runs)
    with tqdm(total=steps, desc="measuring", unit="call", file=sys.stderr, disable=None) as bar:
        for device in devices:
            mode = dev.set_fp32_mode(device, args.fp32_mode)
            rec = cli.recognizer(args, model, device, dtype)
            results["devices"].append(
                {
                    "device": str(device),
                    "device_name": dev.device_name(device),
                    "environment": dev.environment(device),
                    "fp32_mode": mode,
                    "settings": rec.settings,
                    "rows": measure_device(rec, args.batch_sizes, args.warmup, args.runs, bar),
                }
            )
    cpu = next((d for d in results["devices"] if d["device"] == "cpu"), None)
    if cpu:
        results["speedup"] = [
            {"device": d["device"], "batch_size": r["batch_size"], "cpu_mean_ms": c["mean_ms"], "device_mean_ms": r["mean_ms"],
             "speedup": c["mean_ms"] / r["mean_ms"]}
            for d in results["devices"] if d is not cpu
            for c, r in zip(cpu["rows"], d["rows"])
        ]
    if args.cpu_roofline:
        cli.note("measuring the CPU targets (interleaved rounds)")
        results["cpu_roofline"] = cpu_roofline(model, args.runs)
    if args.vs_onnxruntime:
        cli.note("measuring ONNX Runtime")
        results["onnxruntime"] = onnxruntime_rows(model, args.batch_sizes, args.warmup, args.runs)
    m = results["machine"]
    print(f"# Performance: {m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads), torch {m['torch']}\n")
    print(f"checkpoint: {checkpoint}; {args.warmup} warm-up and {args.runs} timed calls per batch size\n")
    print(markdown(results))
    if args.json:
        cli.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    cli.run(main)
