"""export.py writes an ONNX file that the checker accepts, that holds only operators on ATC's
list, and that ONNX Runtime reads as PyTorch does; the file is one more target of the tools."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_no_traceback, run_cli
from model import HEADS
from svhn.checkpoints import load_model
from svhn.images import photo_input, to_tensor

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -r requirements-export.txt)")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -r requirements-export.txt)")
ATC_LISTED = {"Conv", "Relu", "MaxPool", "Gemm", "Flatten", "Split"}  # what this network needs, all on ATC's list
EXAMPLES = sorted((ROOT / "examples").glob("*.png"))


@pytest.fixture(scope="module")
def dynamic_export(random_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "svhn.onnx"
    result = run_cli("export.py", "--checkpoint", str(random_checkpoint), "--output", str(out))
    assert_no_traceback(result)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def independent_run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """ONNX Runtime on the file, set up here rather than through the project's runner."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == list(HEADS)
    return dict(zip(HEADS, session.run(None, {"image": x})))


def test_the_dynamic_export_is_proved(dynamic_export, random_checkpoint):
    proof = json.loads(Path(str(dynamic_export) + ".json").read_text())
    assert proof["verdict"] == "PASS" and proof["checker"] == "passed" and proof["opset"] == 11
    assert proof["batch"] == "dynamic" and proof["inputs"] == {"image": ["batch", 3, 54, 54]}
    assert set(proof["op_histogram"]) <= ATC_LISTED and proof["op_histogram"]["Conv"] == 8
    assert sorted(proof["parity"]) == ["1", "64", "7"]
    for report in proof["parity"].values():
        assert report["verdict"] == "PASS" and report["images"] == len(EXAMPLES) + 100
    # the numbers, checked here with a session of our own against the published module
    model = load_model(random_checkpoint)
    x = to_tensor([photo_input(p) for p in EXAMPLES])
    with torch.inference_mode():
        want = model(x)
    for n in (1, 5, len(EXAMPLES)):
        got = independent_run(dynamic_export, x[:n].numpy())
        for head, w in zip(HEADS, want):
            assert np.abs(got[head] - w[:n].numpy()).max() < 1e-4 * max(1.0, float(w.abs().max()))


def test_a_fixed_batch_export_has_no_batch_dependent_operators(random_checkpoint, tmp_path):
    out = tmp_path / "svhn_bs4.onnx"
    result = run_cli("export.py", "--checkpoint", str(random_checkpoint), "--output", str(out), "--batch", "4", "--samples", "10")
    assert_no_traceback(result)
    assert result.returncode == 0, result.stdout + result.stderr
    proof = json.loads((tmp_path / "svhn_bs4.onnx.json").read_text())
    assert proof["batch"] == 4 and proof["batch_dependent_ops"] == [] and list(proof["parity"]) == ["4"]
    assert "batch-dependent operators: none" in result.stdout
    graph = onnx.load(str(out)).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [4, 3, 54, 54]
    assert not {n.op_type for n in graph.node} & {"Shape", "Gather", "Reshape", "Expand", "ConstantOfShape"}
    assert independent_run(out, np.zeros((4, 3, 54, 54), np.float32))["length"].shape == (4, 7)


def test_inference_reads_the_examples_from_the_onnx_file_as_from_pytorch(dynamic_export, random_checkpoint):
    torch_run = run_cli("inference.py", "--whole-image", "--checkpoint", str(random_checkpoint), "--device", "cpu")
    onnx_run = run_cli("inference.py", "--whole-image", "--onnx", str(dynamic_export), "--batch-size", "4")
    assert onnx_run.returncode == 0, onnx_run.stderr
    assert "CPUExecutionProvider" in onnx_run.stderr
    assert [line.split("  ")[:2] for line in onnx_run.stdout.splitlines()] == [line.split("  ")[:2] for line in torch_run.stdout.splitlines()]
    assert len(onnx_run.stdout.splitlines()) == len(EXAMPLES)
    compared = run_cli("inference.py", "--whole-image", "--onnx", str(dynamic_export), "--checkpoint", str(random_checkpoint), "--compare", "--json")
    assert compared.returncode == 0, compared.stderr
    report = json.loads(compared.stdout)["comparison"]
    assert report["verdict"] == "PASS" and report["target"]["provider"] == "CPUExecutionProvider"


def test_the_evaluation_scripts_take_the_onnx_file(dynamic_export, random_checkpoint, tmp_path):
    result = run_cli("evaluation/eval_precision.py", "--onnx", str(dynamic_export), "--checkpoint", str(random_checkpoint), "--samples", "8")
    assert result.returncode == 0 and "verdict: PASS" in result.stdout, result.stdout + result.stderr
    out = tmp_path / "perf.json"
    result = run_cli("evaluation/eval_performance.py", "--checkpoint", str(random_checkpoint), "--devices", "cpu", "--onnx", str(dynamic_export),
                     "--batch-sizes", "1", "3", "--warmup", "1", "--runs", "3", "--json", str(out))
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    onnx_rows = next(d for d in data["devices"] if d["device"] == "onnxruntime:CPUExecutionProvider")
    assert onnx_rows["settings"]["provider"] == "CPUExecutionProvider" and onnx_rows["settings"]["runtime"].startswith("onnxruntime ")
    assert [r["batch_size"] for r in onnx_rows["rows"]] == [1, 3] and all(len(r["times_ms"]) == 3 for r in onnx_rows["rows"])
    assert any(s["device"] == "onnxruntime:CPUExecutionProvider" for s in data["speedup"])


@pytest.mark.parametrize(
    "args, words",
    [
        (["--opset", "8"], "opset 8 is out of range: ATC accepts ONNX opsets 9 to 18"),
        (["--opset", "19"], "opset 19 is out of range"),
        (["--batch", "0"], "must be at least 1"),
        (["--output", "/nonexistent/dir/x.onnx"], "/nonexistent/dir/x.onnx: cannot write here (No such file or directory)"),
        (["--checkpoint", "/nonexistent/model-1.pth"], "no such file or folder"),
    ],
)
def test_bad_export_requests_are_one_line(random_checkpoint, tmp_path, args, words):
    full = ["--checkpoint", str(random_checkpoint), "--output", str(tmp_path / "x.onnx"), *args]
    result = run_cli("export.py", *full)
    assert_no_traceback(result)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert "error: " in result.stderr.strip().splitlines()[-1]  # argparse's usage lines, then one error line


def test_missing_onnx_packages_are_one_line(random_checkpoint, tmp_path):
    # an onnx that cannot be imported, as on a machine without requirements-export.txt
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "__init__.py").write_text("raise ImportError('No module named onnx')\n")
    result = run_cli("export.py", "--checkpoint", str(random_checkpoint), "--output", str(tmp_path / "x.onnx"), env={"PYTHONPATH": str(tmp_path)})
    assert_no_traceback(result)
    assert result.returncode == 2 and "onnx is not installed: pip install -r requirements-export.txt" in result.stderr


def test_a_file_that_is_not_onnx(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"not a model")
    result = run_cli("inference.py", "--onnx", str(tmp_path / "x.onnx"))
    assert_no_traceback(result)
    assert result.returncode == 2 and "the ONNX checker refuses it" in result.stderr
    result = run_cli("inference.py", "--onnx", str(tmp_path / "none.onnx"))
    assert result.returncode == 2 and "no such ONNX file" in result.stderr


@pytest.mark.slow
def test_ais_bench_inputs_and_outputs_score_as_the_onnx_file_does(random_checkpoint, samples, tmp_path):
    """eval_accuracy.py writes the crops as ais_bench inputs and scores ais_bench's outputs.
    No .om runs here: ONNX Runtime on a fixed-batch export stands in for the .om, writing its
    outputs under ais_bench's names (<input>_<output index>.txt), one number per value."""
    onnx_file = tmp_path / "svhn_bs4.onnx"
    assert run_cli("export.py", "--checkpoint", str(random_checkpoint), "--output", str(onnx_file), "--batch", "4", "--samples", "0").returncode == 0
    bins, outputs = tmp_path / "bins", tmp_path / "om_out"
    result = run_cli("evaluation/eval_accuracy.py", "--data", str(samples), "--write-bins", str(bins), "--batch-size", "4")
    assert result.returncode == 0 and "15 images in 4 inputs of batch 4" in result.stdout, result.stdout + result.stderr
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    outputs.mkdir()
    for path in sorted(bins.glob("*.bin")):
        x = np.fromfile(path, dtype=np.float32).reshape(4, 3, 54, 54)
        for i, head in enumerate(session.run(None, {"image": x})):
            np.savetxt(outputs / f"{path.stem}_{i}.txt", head.reshape(-1))
    om_json, onnx_json = tmp_path / "om.json", tmp_path / "onnx.json"
    result = run_cli("evaluation/eval_accuracy.py", "--data", str(samples), "--bins", str(bins), "--om-outputs", str(outputs), "--json", str(om_json))
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    result = run_cli("evaluation/eval_accuracy.py", "--data", str(samples), "--onnx", str(onnx_file), "--json", str(onnx_json))
    om_report, onnx_report = json.loads(om_json.read_text()), json.loads(onnx_json.read_text())
    assert om_report["images_scored"] == onnx_report["images_scored"] == 15
    assert [(p["file"], p["number"]) for p in om_report["images"]] == [(p["file"], p["number"]) for p in onnx_report["images"]]
    assert om_report["accuracy"] == onnx_report["accuracy"]
    (outputs / "batch-000002_3.txt").unlink()
    result = run_cli("evaluation/eval_accuracy.py", "--data", str(samples), "--bins", str(bins), "--om-outputs", str(outputs))
    assert_no_traceback(result)
    assert result.returncode == 1 and "batch-000002_3.txt: no such ais_bench output (digit3 of batch-000002.bin)" in result.stderr
