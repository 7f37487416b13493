#!/usr/bin/env python3
"""Latency and throughput of the recognizer and the localizer per device and batch size, the
CPU-vs-device speed-up, and the whole find-then-read pipeline from image files.

    python evaluation/eval_performance.py                          # CPU and the accelerator, if any
    python evaluation/eval_performance.py --devices cpu npu --batch-sizes 1 4 8 16 64 --json perf.json
    python evaluation/eval_performance.py --devices cpu --cpu-roofline --onnx svhn.onnx svhn_localizer.onnx
    python evaluation/eval_performance.py --network localizer --pipeline photos/

Per device and batch size: the first call is timed alone (cold start: NPUs compile per shape),
then --warmup untimed calls, then --runs timed calls with the device synchronised around each
(device events on accelerators). The timed region is the forward pass on a batch already on the
device; `e2e` adds the copy in and the logits' copy back. --cpu-roofline measures the CPU's fp32
peak and the default path against it in one run; --onnx FILE adds the exported file under ONNX
Runtime (its execution provider named) as one more target. The localizer's time over the
recognizer's is printed per batch size. --pipeline (default: the bundled examples, repeated to at
least 256 images) times, per device, the loader alone (decode and letterbox on --workers threads)
and the whole pipeline from the files (decode, letterbox, localize, crop, read) at --batch-size,
with the share of it each network took: which part bounds the throughput.
"""

import svhn  # noqa: F401  (first: keeps torch_npu from loading itself at `import torch`)

import argparse
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import localizer
from localizer import Localizer
from model import SPEC, SVHNModel, WeightsError, flops_per_image
from svhn import devices, exits, flags, output, roofline
from svhn.checkpoints import find_checkpoint, find_localizer, load_localizer, load_model
from svhn.finder import find_and_read, photo_for_finding
from svhn.images import expand_inputs, load_ahead, random_input
from svhn.network import Runnable
from svhn.recognizer import Recognizer
from svhn.setup import Setup, localizer_net, onnx_nets, recognizer, resolve_device
from svhn.text import shown


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("what to measure")
    group.add_argument("--devices", nargs="+", default=None, help="devices to measure (default: cpu and the accelerator, if any)")
    group.add_argument("--batch-sizes", nargs="+", type=flags.positive_int, default=[1, 4, 8, 16], help="(default: %(default)s)")
    group.add_argument("--warmup", type=flags.non_negative_int, default=10, help="untimed calls per batch size after the cold one (default: %(default)s)")
    group.add_argument("--runs", type=flags.positive_int, default=50, help="timed calls per batch size (default: %(default)s)")
    group.add_argument(
        "--cpu-roofline", action="store_true",
        help="the CPU in one run: default path vs plain eager NCHW at batch 1, and at batch 16 against the machine's measured fp32 peak",
    )
    group.add_argument("--network", choices=("recognizer", "localizer", "all"), default="all", help="(default: %(default)s)")
    group = parser.add_argument_group("the pipeline from image files")
    group.add_argument("--pipeline", nargs="*", default=None, metavar="PATH", help="images to run the pipeline on (default: the bundled examples)")
    group.add_argument("--no-pipeline", action="store_true", help="time the networks only")
    group.add_argument("--pipeline-images", type=flags.positive_int, default=256, help="repeat the images up to this many (default: %(default)s)")
    flags.add_loader_args(group, batch_size=16)
    flags.add_run_args(parser)
    parser.add_argument("--json", metavar="FILE", help="write every figure, the machine and the settings here")
    return parser.parse_args(argv)


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


def measure_device(rec: Runnable, batch_sizes: list[int], warmup: int, runs: int, bar: tqdm) -> list[dict]:
    """One row per batch size for one prepared network."""
    timer = devices.DeviceTimer(rec.device)
    rows = []
    for bs in batch_sizes:
        bar.set_description(f"{rec.device} batch {bs}")
        cpu_batch = random_input(bs, seed=bs, size=rec.spec.input_size)
        x = rec.prepare(cpu_batch)
        devices.synchronize(rec.device)
        devices.reset_peak_memory(rec.device)
        cold = timer(lambda: rec.run(x))
        for _ in range(warmup):
            rec.run(x)
            bar.update()
        times = []
        for _ in range(runs):
            times.append(timer(lambda: rec.run(x)))
            bar.update()
        rec.outputs(cpu_batch)  # the copy back's own first call
        e2e = [timer(lambda: rec.outputs(cpu_batch)) for _ in range(max(1, runs // 5))]
        peak = devices.peak_memory(rec.device)
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


def cpu_roofline(model: SVHNModel, runs: int) -> dict:
    """The CPU measured in one run: the default path against a plain eager NCHW fp32 forward at
    batch 1, and at batch 16 against the machine's fp32 peak (svhn.roofline), all interleaved."""
    eager = Recognizer(model, "cpu", fold=False, channels_last=False)
    fast = Recognizer(model, "cpu")
    kernels = roofline.peak_kernels()
    x1, x16 = random_input(1, seed=1), random_input(16, seed=16)
    med = roofline.interleaved_medians(
        {
            "eager_b1": lambda: eager.run(x1),
            "default_b1": lambda: fast.run(fast.prepare(x1)),
            "default_b16": lambda: fast.run(fast.prepare(x16)),
            **{name: fn for name, (fn, _) in kernels.items()},
        },
        runs,
    )
    peak = roofline.peak_rates(med, kernels)
    b16 = 16 / med["default_b16"]
    return {
        "eager_nchw_b1_images_per_s": 1 / med["eager_b1"],
        "default_b1_images_per_s": 1 / med["default_b1"],
        "speedup_b1_vs_eager_nchw": med["eager_b1"] / med["default_b1"],
        "sgemm_2048_gflops": peak["sgemm_gflops"],
        "largest_conv": peak["largest_conv"],
        "largest_conv_b16_gflops": peak["conv_gflops"],
        "fp32_peak_gflops": peak["fp32_peak_gflops"],
        "peak_images_per_s": peak["fp32_peak_gflops"] * 1e9 / flops_per_image(),
        "default_b16_images_per_s": b16,
        "default_b16_gflops": b16 * flops_per_image() / 1e9,
        "b16_fraction_of_peak": b16 * flops_per_image() / 1e9 / peak["fp32_peak_gflops"],
        "default_path": fast.settings,
        "statistic": "median of interleaved rounds",
    }


def load_any_localizer(path: str | None) -> tuple[Localizer, str]:
    """The localizer --localizer names, else the shipped one, else random weights (noted)."""
    try:
        found = find_localizer(path)
        return load_localizer(found), str(found)
    except WeightsError as e:
        if path:
            exits.die(str(e))
        exits.note(f"{e}; timing a random {localizer.DEFAULT_ARCH} localizer (speed does not depend on the weights)")
        torch.manual_seed(0)
        return Localizer().eval(), "random weights"


def pipeline(paths: list, run: Setup, args: argparse.Namespace) -> dict:
    """From image files: the loader alone, then decode + letterbox + localize + crop + read, at
    --batch-size on --workers loader threads; images/s of each, and the networks' shares."""
    items = list(enumerate(paths))
    start = time.perf_counter()
    for _ in load_ahead(items, lambda item: photo_for_finding(item[1]), args.batch_size, args.workers, to_batch=False):
        pass
    loader = len(items) / (time.perf_counter() - start)
    spent = {"localizer": 0.0, "recognizer": 0.0}

    def timed(net, name):
        def call(batch, names):
            t = time.perf_counter()
            out = net.outputs(batch)  # outputs() copies back, so the device has finished
            spent[name] += time.perf_counter() - t
            return out
        return call

    start = time.perf_counter()
    found = 0
    for done, photos, _ in load_ahead(items, lambda item: photo_for_finding(item[1]), args.batch_size, args.workers, to_batch=False):
        results = find_and_read(photos, [str(p) for _, p in done], timed(run.localizer, "localizer"), timed(run.recognizer, "recognizer"), args.find_score)
        found += sum(len(r.found) for r in results)
    total = time.perf_counter() - start
    return {"images": len(items), "batch_size": args.batch_size, "workers": args.workers, "loader_images_per_s": loader,
            "pipeline_images_per_s": len(items) / total, "numbers_found": found,
            "localizer_share": spent["localizer"] / total, "recognizer_share": spent["recognizer"] / total,
            "rest_share": 1 - (spent["localizer"] + spent["recognizer"]) / total,
            "bound_by": "the loader" if loader < 1.25 * len(items) / total else "the networks"}


def default_devices(spec: str) -> list[str]:
    """--device auto measures the CPU and the accelerator, if any; another --device, that one."""
    if spec != "auto":
        return [spec]
    accel = resolve_device("auto")
    return ["cpu"] if accel.type == "cpu" else ["cpu", str(accel)]


def load_any_model(checkpoint: str | None) -> tuple[SVHNModel, str]:
    """Speed does not depend on the weights: with no checkpoint given or found, random ones are timed."""
    try:
        path = find_checkpoint(checkpoint, download=False)
    except WeightsError as e:
        if checkpoint:
            exits.die(str(e))
        exits.note("no checkpoint found; timing random weights (speed does not depend on them)")
        torch.manual_seed(0)
        return SVHNModel().eval(), "random weights"
    return load_model(path), str(path)


def markdown(results: dict) -> str:
    out = []
    for entry in results["devices"]:
        s = entry["settings"]
        out.append(
            f"## {entry['network']}: {entry['device_name']} ({entry['device']}), {s['dtype']}, fp32 conv {entry['fp32_mode']['conv']} / "
            f"matmul {entry['fp32_mode']['matmul']}, {s['kernels']}, {s['memory_format']}, graph {s['graph_mode']}\n"
        )
        rows = [
            [r["batch_size"], f"{r['cold_start_ms']:.2f}", f"{r['mean_ms']:.2f}", f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}",
             f"{r['p99_ms']:.2f}", f"{r['images_per_s']:.1f}", f"{r['e2e_mean_ms']:.2f}",
             "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"]
            for r in entry["rows"]
        ]
        header = ["batch", "cold start ms", "mean ms", "P50 ms", "P95 ms", "P99 ms", "images/s", "e2e mean ms", "peak MB"]
        out.append(output.markdown_table(header, rows) + "\n")
    if results.get("speedup"):
        out.append("## Speed-up over the CPU (same batch size, mean latency)\n")
        rows = [[s["network"], s["device"], s["batch_size"], f"{s['cpu_mean_ms']:.2f}", f"{s['device_mean_ms']:.3f}", f"{s['speedup']:.1f}x"] for s in results["speedup"]]
        out.append(output.markdown_table(["network", "device", "batch", "CPU ms", "device ms", "speed-up"], rows) + "\n")
    if results.get("localizer_over_recognizer"):
        out.append("## The localizer's time over the recognizer's (same device and batch, mean latency)\n")
        rows = [[r["device"], r["batch_size"], f"{r['localizer_ms']:.2f}", f"{r['recognizer_ms']:.2f}", f"{r['localizer_over_recognizer']:.3f}"]
                for r in results["localizer_over_recognizer"]]
        out.append(output.markdown_table(["device", "batch", "localizer ms", "recognizer ms", "ratio"], rows) + "\n")
    if results.get("pipeline"):
        out.append("## Find, then read, from image files\n")
        rows = [[p["device"], p["images"], p["batch_size"], p["workers"], f"{p['loader_images_per_s']:.1f}", f"{p['pipeline_images_per_s']:.1f}",
                 f"{100 * p['localizer_share']:.0f} %", f"{100 * p['recognizer_share']:.0f} %", f"{100 * p['rest_share']:.0f} %", p["bound_by"]]
                for p in results["pipeline"]]
        out.append(output.markdown_table(["device", "images", "batch", "loader threads", "loader images/s", "pipeline images/s",
                                          "localizer", "recognizer", "rest (crops, waiting)", "bound by"], rows) + "\n")
    if results.get("cpu_roofline"):
        r = results["cpu_roofline"]
        c = r["largest_conv"]
        out.append("## CPU roofline (one run, medians of interleaved rounds)\n")
        out.append(
            output.markdown_table(
                ["measure", "value"],
                [
                    ["plain eager NCHW fp32, batch 1", f"{r['eager_nchw_b1_images_per_s']:.1f} images/s"],
                    ["default path, batch 1", f"{r['default_b1_images_per_s']:.1f} images/s"],
                    ["default over plain eager, batch 1", f"{r['speedup_b1_vs_eager_nchw']:.2f}x"],
                    ["sgemm 2048^3 (torch.mm)", f"{r['sgemm_2048_gflops']:.1f} GFLOP/s"],
                    [f"oneDNN conv {c['cin']}->{c['cout']} at {c['side']}x{c['side']}, batch 16", f"{r['largest_conv_b16_gflops']:.1f} GFLOP/s"],
                    ["fp32 peak (best of the two)", f"{r['fp32_peak_gflops']:.1f} GFLOP/s = {r['peak_images_per_s']:.1f} images/s"],
                    ["default path, batch 16", f"{r['default_b16_images_per_s']:.1f} images/s = {r['default_b16_gflops']:.1f} GFLOP/s"],
                    ["batch 16 as a fraction of the peak", f"{100 * r['b16_fraction_of_peak']:.0f} %"],
                ],
            )
            + "\n"
        )
    return "\n".join(out)


def entry(net: Runnable, name: str, device: str, device_name: str, env: dict, mode: dict, args: argparse.Namespace, bar: tqdm) -> dict:
    return {"network": name, "device": device, "device_name": device_name, "environment": env, "fp32_mode": mode, "settings": net.settings,
            "rows": measure_device(net, args.batch_sizes, args.warmup, args.runs, bar)}


def ratios(results: dict) -> list[dict]:
    """The localizer's mean latency over the recognizer's, per device and batch size."""
    out = []
    for loc in (d for d in results["devices"] if d["network"] == "localizer"):
        rec = next((d for d in results["devices"] if d["network"] == "recognizer" and d["device"] == loc["device"]), None)
        for a, b in zip(loc["rows"], rec["rows"] if rec else []):
            out.append({"device": loc["device"], "batch_size": a["batch_size"], "localizer_ms": a["mean_ms"], "recognizer_ms": b["mean_ms"],
                        "localizer_over_recognizer": a["mean_ms"] / b["mean_ms"]})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.find_score = localizer.SCORE_THRESHOLD
    out = output.JsonOutput(args.json) if args.json else None
    networks = ("recognizer", "localizer") if args.network == "all" else (args.network,)
    model, checkpoint = load_any_model(args.checkpoint)
    loc_model, loc_checkpoint = load_any_localizer(args.localizer) if "localizer" in networks or not args.no_pipeline else (None, None)
    options = flags.run_options(args)
    specs = args.devices or default_devices(args.device)
    targets = [resolve_device(spec) for spec in specs]
    results: dict = {
        "checkpoint": checkpoint,
        **({"localizer": loc_checkpoint} if loc_model is not None else {}),
        "settings": {"dtype": args.dtype, "warmup": args.warmup, "runs": args.runs, "batch_sizes": args.batch_sizes,
                     "timed_region": "forward on a batch already on the device, synchronised"},
        "machine": devices.environment(torch.device("cpu")),
        "devices": [],
    }
    onnx_targets = list(onnx_nets(tuple(args.onnx), [SPEC, localizer.spec(loc_model.arch_name if loc_model else localizer.DEFAULT_ARCH)]).values()) if args.onnx else []
    steps = (len(targets) * len(networks) + len(onnx_targets)) * len(args.batch_sizes) * (args.warmup + args.runs)
    paths = [] if args.no_pipeline else pipeline_images(args)
    with tqdm(total=steps, desc="measuring", unit="call", file=sys.stderr, disable=None) as bar:
        for device in targets:
            mode = devices.set_fp32_mode(device, args.fp32_mode)
            run = Setup(model, None, device, mode, recognizer(options, model, device), loc_model, None,
                        localizer_net(options, loc_model, device) if loc_model is not None else None)
            env = devices.environment(device)
            for name in networks:
                net = run.recognizer if name == "recognizer" else run.localizer
                results["devices"].append(entry(net, name, str(device), devices.device_name(device), env, mode, args, bar))
            if paths:
                results.setdefault("pipeline", []).append({"device": str(device), **pipeline(paths, run, args)})
        for net in onnx_targets:
            cpu_name = devices.device_name(torch.device("cpu")) if net.provider == "CPUExecutionProvider" else net.provider
            results["devices"].append(entry(net, net.spec.name, f"onnxruntime:{net.provider}", cpu_name, devices.environment(torch.device("cpu")),
                                            {"conv": "ieee", "matmul": "ieee"}, args, bar))
    for name in networks:
        cpu = next((d for d in results["devices"] if d["device"] == "cpu" and d["network"] == name), None)
        if cpu:
            results.setdefault("speedup", []).extend(
                {"network": name, "device": d["device"], "batch_size": r["batch_size"], "cpu_mean_ms": c["mean_ms"], "device_mean_ms": r["mean_ms"],
                 "speedup": c["mean_ms"] / r["mean_ms"]}
                for d in results["devices"] if d is not cpu and d["network"] == name
                for c, r in zip(cpu["rows"], d["rows"])
            )
    ratio = ratios(results)
    if ratio:
        results["localizer_over_recognizer"] = ratio
    if args.cpu_roofline:
        exits.note("measuring the CPU targets (interleaved rounds)")
        results["cpu_roofline"] = cpu_roofline(model, args.runs)
    m = results["machine"]
    print(f"# Performance: {m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads), torch {m['torch']}\n")
    print(f"checkpoint: {checkpoint}" + (f"; localizer: {loc_checkpoint}" if loc_model is not None else "")
          + f"; {args.warmup} warm-up and {args.runs} timed calls per batch size\n")
    print(markdown(results))
    if out:
        out.finish(results)
    return 0


def pipeline_images(args: argparse.Namespace) -> list:
    paths, problems = expand_inputs(args.pipeline if args.pipeline else [shown(flags.EXAMPLES)])
    for line in problems:
        exits.error(line)
    if not paths:
        exits.die("--pipeline: no images to run the pipeline on", exits.EXIT_FAILED)
    return (paths * (args.pipeline_images // len(paths) + 1))[: max(args.pipeline_images, len(paths))]


if __name__ == "__main__":
    exits.run(main)
