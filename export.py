#!/usr/bin/env python3
"""Export the recognizer or the localizer to ONNX for Ascend's ATC/OM path and for ONNX Runtime,
then prove the file.

    python export.py --output svhn.onnx                       # dynamic batch, opset 11
    python export.py --output svhn_bs16.onnx --batch 16       # fixed batch, for atc --input_shape
    python export.py --network localizer                      # svhn_localizer.onnx

The recognizer's file: input `image` (N x 3 x 54 x 54 float32, already normalised as
inference.py prepares it), outputs `length, digit1 .. digit5` (the published tuple's order). The
localizer's: input `image` (N x 3 x 160 x 160, the letterboxed photo, normalised the same way),
outputs `heatmap` (N x 1 x G x G) and `box` (N x 4 x G x G); decoding stays on the host
(localizer.decode). BatchNorm folded in both.
After every export the file is checked: the ONNX checker; its operators (histogram printed) all on
ATC's list and none batch-dependent at a fixed batch; ONNX Runtime on the CPU against the PyTorch
CPU fp32 reference under deviation.py's rules, on the bundled examples plus --samples seeded
random inputs, at batch 1, 7 and 64 (dynamic) or the fixed batch. The proof goes to stdout and to
<output>.json. Exit status: 0 written and proved; 1 written but a check failed; 2 usage errors.
"""

import svhn  # noqa: F401  (first: keeps torch_npu from loading itself at `import torch`)

import argparse
from pathlib import Path

from typing import Callable

import torch
from torch import nn

import localizer
from model import SPEC
from svhn import deviation, exits, flags, output
from svhn.checkpoints import find_localizer, load_localizer
from svhn.files import check_writable, write_bytes_atomic
from svhn.finder import photo_for_finding
from svhn.images import expand_inputs, photo_input, random_input, to_tensor
from svhn.network import Comparison, DeviceNet, NetworkSpec, fold_batchnorm, reference as network_reference
from svhn.onnx_model import DEFAULT_OPSET, OnnxNet, check_opset, export, inspect, problems, require
from svhn.recognizer import InferenceNet, reference
from svhn.setup import load_checkpoint
from svhn.text import printable, shown

DYNAMIC_BATCHES = (1, 7, 64)


def batch_arg(text: str) -> int | None:
    return None if text == "dynamic" else flags.positive_int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_model_args(parser)
    group = parser.add_argument_group("export")
    group.add_argument("--network", choices=("recognizer", "localizer"), default="recognizer",
                       help="the recognizer (--checkpoint) or the localizer (--localizer) (default: %(default)s)")
    group.add_argument("--output", default=None, metavar="FILE.onnx", help="(default: svhn.onnx, or svhn_localizer.onnx for the localizer)")
    group.add_argument("--batch", type=batch_arg, default=None, metavar="N|dynamic", help="fixed batch size, or dynamic (default)")
    group.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset, 9 to 18 (default: %(default)s, which CANN 6 to 8 accept)")
    group = parser.add_argument_group("proof")
    group.add_argument("--samples", type=flags.non_negative_int, default=100, help="seeded random inputs beside the examples (default: %(default)s)")
    args = parser.parse_args(argv)
    args.output = args.output or ("svhn.onnx" if args.network == "recognizer" else "svhn_localizer.onnx")
    return args


def network(args: argparse.Namespace) -> tuple[nn.Module, DeviceNet, NetworkSpec, Path, Callable]:
    """What to export: the inference form, the reference it is proved against, its spec, the
    checkpoint file, and how an example photo becomes its input."""
    if args.network == "localizer":
        path = find_localizer(args.localizer)
        model = load_localizer(path)
        spec = localizer.spec(model.arch_name)
        return fold_batchnorm(model), network_reference(model, spec), spec, path, lambda p: photo_for_finding(p).input
    model, path = load_checkpoint(args.checkpoint)
    return InferenceNet(model), reference(model), SPEC, path, photo_input


def parity(ref, path: Path, batches: tuple[int, ...], inputs: torch.Tensor, names: list[str]) -> dict:
    """ONNX Runtime (CPU) against the PyTorch CPU fp32 reference, per batch size."""
    onnx_run = OnnxNet(path, [ref.spec], provider="CPUExecutionProvider")
    out = {}
    for bs in batches:
        comparison = Comparison(ref, onnx_run)
        for start in range(0, len(inputs), bs):
            comparison.add(inputs[start : start + bs], names[start : start + bs])
        out[bs] = comparison.report()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require("onnx")
    require("onnxruntime")
    check_opset(args.opset)
    output_path = Path(args.output)
    proof_path = output_path.with_name(output_path.name + ".json")
    try:  # found unwritable before the work, not after; nothing is created under the final names
        check_writable(output_path.parent)
    except OSError as e:
        exits.die(f"{printable(output_path)}: cannot write here ({e.strerror})")
    net, ref, spec, checkpoint, prepare = network(args)
    try:
        export(net, spec, output_path, args.batch, args.opset)
        info = inspect(output_path)
    except OSError as e:
        exits.die(f"{printable(output_path)}: export failed ({e.strerror or e}); nothing written", exits.EXIT_FAILED)
    found = problems(info, spec)

    paths, errors = expand_inputs([shown(flags.EXAMPLES)])
    examples = [prepare(p) for p in paths]
    noise = random_input(args.samples, seed=0, size=spec.input_size)
    inputs = torch.cat([to_tensor(examples), noise]) if examples else noise
    names = [shown(p) for p in paths] + [f"random#{i}" for i in range(args.samples)]
    reports = parity(ref, output_path, DYNAMIC_BATCHES if args.batch is None else (args.batch,), inputs, names)
    print_proof(output_path, checkpoint, info, reports)
    failed = found + [f"parity FAIL at batch {bs}" for bs, r in reports.items() if r["verdict"] != "PASS"]
    verdict = "PASS" if not failed else "FAIL"
    print(f"\nexport verdict: {verdict}" + (f" ({'; '.join(failed)})" if failed else ""))
    proof = {"onnx": str(output_path), "checkpoint": str(checkpoint), "torch": torch.__version__, "exporter": "torch.onnx.export(dynamo=False)",
             **info, "problems": found, "parity": {str(bs): r for bs, r in reports.items()}, "verdict": verdict, "complete": True}
    try:
        write_bytes_atomic(proof_path, (output.dumps(proof) + "\n").encode())
    except OSError as e:
        output_path.unlink(missing_ok=True)  # an unproved file is not left behind as if it were proved
        exits.die(f"{printable(proof_path)}: cannot write the proof ({e.strerror or e}); {printable(output_path)} removed", exits.EXIT_FAILED)
    exits.note(f"proof written to {shown(proof_path)}")
    return 0 if not failed else exits.EXIT_FAILED


def print_proof(path: Path, checkpoint: Path, info: dict, reports: dict) -> None:
    print(f"# Export: {shown(path)} ({path.stat().st_size / 1e6:.1f} MB) from {shown(checkpoint)}\n")
    print(f"opset {info['opset']}, batch {info['batch']}, input {info['inputs']}, ONNX checker {info['checker']}\n")
    print(output.markdown_table(["operator", "count"], [[k, v] for k, v in info["op_histogram"].items()]))
    print("\nATC operator list: " + ("all listed" if not info["ops_not_on_atc_list"] else "NOT listed: " + ", ".join(info["ops_not_on_atc_list"])))
    if info["batch"] != "dynamic":
        print("batch-dependent operators: " + (", ".join(info["batch_dependent_ops"]) or "none"))
    for bs, report in reports.items():
        print(f"\n## ONNX Runtime CPU against the PyTorch CPU fp32 reference, batch {bs}, {report['images']} inputs\n")
        print(deviation.markdown(report))

if __name__ == "__main__":
    exits.run(main)
