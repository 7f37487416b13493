#!/usr/bin/env python3
"""Export the recognizer to ONNX for Ascend's ATC/OM path and for ONNX Runtime, then prove the file.

    python export.py --output svhn.onnx                       # dynamic batch, opset 11
    python export.py --output svhn_bs16.onnx --batch 16       # fixed batch, for atc --input_shape

The file: input `image` (N x 3 x 54 x 54 float32, already normalised as inference.py prepares
it), outputs `length, digit1 .. digit5` (the published tuple's order), BatchNorm folded.
After every export the file is checked: the ONNX checker; its operators (histogram printed) all on
ATC's list and none batch-dependent at a fixed batch; ONNX Runtime on the CPU against the PyTorch
CPU fp32 reference under deviation.py's rules, on the bundled examples plus --samples seeded
random inputs, at batch 1, 7 and 64 (dynamic) or the fixed batch. The proof goes to stdout and to
<output>.json. Exit status: 0 written and proved; 1 written but a check failed; 2 usage errors.
"""

import svhn  # noqa: F401  (first: keeps torch_npu from loading itself at `import torch`)

import argparse
from pathlib import Path

import torch

from svhn import cli, deviation
from svhn.images import expand_inputs, noise_images, photo_input, to_tensor
from svhn.onnx_model import DEFAULT_OPSET, OnnxError, OnnxRecognizer, export, inspect, problems, require
from svhn.recognizer import Comparison
from svhn.text import one_line, printable, shown

DYNAMIC_BATCHES = (1, 7, 64)


def batch_arg(text: str) -> int | None:
    return None if text == "dynamic" else cli.positive_int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser)
    group = parser.add_argument_group("export")
    group.add_argument("--output", default="svhn.onnx", metavar="FILE.onnx", help="(default: %(default)s)")
    group.add_argument("--batch", type=batch_arg, default=None, metavar="N|dynamic", help="fixed batch size, or dynamic (default)")
    group.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset, 9 to 18 (default: %(default)s, which CANN 6 to 8 accept)")
    group = parser.add_argument_group("proof")
    group.add_argument("--samples", type=cli.non_negative_int, default=100, help="seeded random inputs beside the examples (default: %(default)s)")
    return parser.parse_args(argv)


def parity(model, path: Path, batches: tuple[int, ...], inputs: torch.Tensor, names: list[str]) -> dict:
    """ONNX Runtime (CPU) against the PyTorch CPU fp32 reference, per batch size."""
    onnx_run = OnnxRecognizer(path, provider="CPUExecutionProvider")
    out = {}
    for bs in batches:
        comparison = Comparison(model, onnx_run)
        for start in range(0, len(inputs), bs):
            comparison.add(inputs[start : start + bs], names[start : start + bs])
        out[bs] = comparison.report()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        require("onnx")
        require("onnxruntime")
        if args.opset not in range(9, 19):
            raise OnnxError(f"opset {args.opset} is out of range: ATC accepts ONNX opsets 9 to 18 (CANN 6.0: 9 to 13)")
    except OnnxError as e:
        cli.die(str(e))
    output = Path(args.output)
    proof_path = output.with_name(output.name + ".json")
    for target in (output, proof_path):  # found unwritable before the work, not after
        try:
            with open(target, "ab"):
                pass
        except OSError as e:
            cli.die(f"{printable(target)}: cannot write here ({e.strerror or one_line(e)})")
    model, checkpoint = cli.load_model_or_exit(args.checkpoint)
    try:
        export(model, output, args.batch, args.opset)
        info = inspect(output)
    except (OnnxError, OSError) as e:
        cli.die(f"{printable(output)}: export failed ({one_line(e)})", cli.EXIT_FAILED)
    found = problems(info)

    paths, errors = expand_inputs([shown(cli.EXAMPLES)])
    examples = [photo_input(p) for p in paths]
    inputs = torch.cat([to_tensor(examples), noise_images(args.samples, 0)]) if examples else noise_images(args.samples, 0)
    names = [shown(p) for p in paths] + [f"random#{i}" for i in range(args.samples)]
    reports = parity(model, output, DYNAMIC_BATCHES if args.batch is None else (args.batch,), inputs, names)

    print(f"# Export: {shown(output)} ({output.stat().st_size / 1e6:.1f} MB) from {shown(checkpoint)}\n")
    print(f"opset {info['opset']}, batch {info['batch']}, input {info['inputs']}, ONNX checker {info['checker']}\n")
    print(cli.markdown_table(["operator", "count"], [[k, v] for k, v in info["op_histogram"].items()]))
    print("\nATC operator list: " + ("all listed" if not info["ops_not_on_atc_list"] else "NOT listed: " + ", ".join(info["ops_not_on_atc_list"])))
    if info["batch"] != "dynamic":
        print("batch-dependent operators: " + (", ".join(info["batch_dependent_ops"]) or "none"))
    for bs, report in reports.items():
        print(f"\n## ONNX Runtime CPU against the PyTorch CPU fp32 reference, batch {bs}, {report['images']} inputs\n")
        print(deviation.markdown(report))
    failed = found + [f"parity FAIL at batch {bs}" for bs, r in reports.items() if r["verdict"] != "PASS"]
    verdict = "PASS" if not failed else "FAIL"
    print(f"\nexport verdict: {verdict}" + (f" ({'; '.join(failed)})" if failed else ""))
    with cli.JsonOutput(proof_path) as out:
        out.finish({"onnx": str(output), "checkpoint": str(checkpoint), "torch": torch.__version__, "exporter": "torch.onnx.export(dynamo=False)",
                    **info, "problems": found, "parity": {str(bs): r for bs, r in reports.items()}, "verdict": verdict})
    cli.note(f"proof written to {shown(proof_path)}")
    return 0 if not failed else cli.EXIT_FAILED


if __name__ == "__main__":
    cli.run(main)
