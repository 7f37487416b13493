"""inference.py through the real CLI in a subprocess: readings, JSON, bad input, --compare."""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, assert_no_traceback, random_model, run_cli, without_root_privilege
from model import decode
from svhn.checkpoints import load_model
from svhn.images import preprocess
from svhn.recognizer import Recognizer

SHARED_README_ROW = re.compile(r"^\|\s*(\S+\.png)\s*\|\s*(\d*)\s*\|\s*(\d*)\s*\|\s*([\d.]+)\s*\|$")


def stand_in_table(checkpoint: Path) -> dict[str, tuple[str, float]]:
    """file -> (number read, confidence) from the stand-in checkpoint's own README, which was
    measured independently of this project."""
    readme = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "README.md"
    if not readme.exists():
        pytest.skip("the stand-in checkpoint has no README with its readings")
    rows = {}
    for line in readme.read_text().splitlines():
        m = SHARED_README_ROW.match(line.strip())
        if m:
            rows[m.group(1)] = (m.group(3), float(m.group(4)))
    return rows


def test_reads_the_samples_as_the_python_api_does(checkpoint, samples):
    result = run_cli("inference.py", "--whole-image", "--checkpoint", str(checkpoint), "--image", str(samples), "--json", "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    assert_no_traceback(result)
    got = json.loads(result.stdout)
    files = sorted(p for p in samples.glob("*.png"))
    assert [Path(r["image"]).name for r in got] == [p.name for p in files]
    model = load_model(checkpoint)
    with torch.inference_mode():
        expected = decode(model(torch.stack([preprocess(p) for p in files])))
    for row, want in zip(got, expected):
        assert set(row) >= {"image", "number", "length", "digits", "confidence"}
        assert (row["number"], row["length"], row["digits"]) == (want.number, want.length, want.digits)
        assert row["confidence"] == pytest.approx(want.confidence, abs=1e-4)
        assert len(row["digits"]) == 5


def test_readings_match_the_stand_in_checkpoints_own_table(checkpoint, samples):
    table = stand_in_table(checkpoint)
    assert len(table) >= 10
    result = run_cli("inference.py", "--whole-image", "--checkpoint", str(checkpoint), "--image", str(samples))
    assert result.returncode == 0, result.stderr
    lines = [line.split("  ") for line in result.stdout.strip().splitlines()]
    read = {Path(path).name: (number, float(conf)) for path, number, conf in lines}
    for name, (number, confidence) in table.items():
        assert read[name][0] == (number or "-"), name
        assert read[name][1] == pytest.approx(confidence, abs=1.5e-3), name


def test_bundled_examples_are_the_default(random_checkpoint):
    result = run_cli("inference.py", "--checkpoint", str(random_checkpoint))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(list((ROOT / "examples").glob("*.png"))) >= 9
    for line in lines:
        path, number, confidence = line.split("  ")
        assert path.startswith("examples/") and re.fullmatch(r"\d+|-", number) and 0 <= float(confidence) <= 1


def test_batch_size_does_not_change_the_readings(random_checkpoint):
    outs = [
        json.loads(run_cli("inference.py", "--whole-image", "--checkpoint", str(random_checkpoint), "--json", "--batch-size", b).stdout)
        for b in ("1", "7")
    ]
    assert [r["number"] for r in outs[0]] == [r["number"] for r in outs[1]]
    assert np.allclose([r["confidence"] for r in outs[0]], [r["confidence"] for r in outs[1]], atol=1e-5)


# --- bad input ----------------------------------------------------------------------------------


def decompression_bomb(path: Path) -> None:
    """A 100 000 x 100 000 PNG of a few hundred bytes: Pillow would need 30 GB to decode it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture()
def bad_inputs(tmp_path) -> tuple[list[str], dict[str, str], list[str]]:
    """(arguments, {path: words its error must hold}, good paths)."""
    good = []
    for i, name in enumerate(["one.png", "two.jpg"]):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(tmp_path / name)
        good.append(str(tmp_path / name))
    (tmp_path / "text.png").write_text("this is not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    data = (tmp_path / "one.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    decompression_bomb(tmp_path / "bomb.png")
    (tmp_path / "no-images").mkdir()
    errors = {
        str(tmp_path / "text.png"): "not an image",
        str(tmp_path / "empty.png"): "empty file",
        str(tmp_path / "cut.png"): "truncated or corrupt",
        str(tmp_path / "bomb.png"): "decompression bomb",
        str(tmp_path / "missing.png"): "no such file",
        str(tmp_path / "no-images"): "no images in this folder",
        str(tmp_path / "nothing-*.png"): "no file matches",
    }
    args = [good[0], *errors, good[1]]
    return args, errors, good


def test_every_bad_input_gets_one_line_and_the_good_ones_are_read(random_checkpoint, bad_inputs):
    args, errors, good = bad_inputs
    result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--batch-size", "2", "--image", *args)
    assert_no_traceback(result)
    assert result.returncode == 1
    read = [line.split("  ")[0] for line in result.stdout.strip().splitlines()]
    assert read == good
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == len(errors), result.stderr
    for path, words in errors.items():
        assert any(line.startswith(f"error: {path}: ") and words in line for line in error_lines), (path, result.stderr)


def test_json_output_keeps_the_good_images(random_checkpoint, bad_inputs):
    args, errors, good = bad_inputs
    result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--json", "--image", *args)
    assert result.returncode == 1
    records = json.loads(result.stdout)
    assert [r["image"] for r in records if "error" not in r] == good
    # every failed input has its record, in input order, with the line that stderr shows
    assert [r["image"] for r in records] == args
    assert all(words in r["error"] for r, words in zip(records[1:-1], errors.values()))


def test_unreadable_folder(random_checkpoint, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(locked / "hidden.png")
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    os.chmod(locked, 0)
    try:
        result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--image", str(locked),
                         str(tmp_path / "ok.png"), prefix=without_root_privilege())
    finally:
        os.chmod(locked, stat.S_IRWXU)
    assert_no_traceback(result)
    assert result.returncode == 1
    assert f"error: {locked}: folder cannot be read (permission denied)" in result.stderr
    assert result.stdout.startswith(str(tmp_path / "ok.png"))


@pytest.mark.parametrize(
    "args, words",
    [
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["--workers", "-1"], "argument --workers: must be at least 0, got -1"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--dtype", "float64"], "invalid choice"),
        (["--checkpoint", "/nonexistent/model-1.pth"], "no such file or folder"),
    ],
)
def test_usage_errors_exit_2(random_checkpoint, args, words):
    full = ["--checkpoint", str(random_checkpoint), *args] if "--checkpoint" not in args else args
    result = run_cli("inference.py", *full)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert_no_traceback(result)


def test_missing_accelerators_are_explained(random_checkpoint):
    result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--device", "cuda:99")
    assert result.returncode == 2
    assert_no_traceback(result)
    if torch.cuda.is_available():
        assert "does not exist" in result.stderr and "CUDA device" in result.stderr
    elif not torch.backends.cuda.is_built():
        assert "built without CUDA" in result.stderr
    else:
        assert "no CUDA device is visible" in result.stderr


# --- --compare -------------------------------------------------------------------------------------


def compare_json(checkpoint, *args) -> tuple[int, dict]:
    result = run_cli("inference.py", "--whole-image", "--checkpoint", str(checkpoint), "--compare", "--json", *args)
    assert_no_traceback(result)
    return result.returncode, json.loads(result.stdout)


def independent_verdict(head: dict, low_precision_u: float | None) -> str:
    """The rules as the README states them, applied to the reported figures."""
    fail = (
        head["nonfinite"] > 0
        or head["cosine"] < 0.9
        or head["max_abs"] > 1
        or (head["cosine"] < 0.99 and head["max_abs"] > 1e-3)
        or (low_precision_u is not None and head["max_abs"] > 4 * low_precision_u * head["reference_range"])
    )
    return "FAIL" if fail else "PASS"


def test_compare_bfloat16_on_cpu(checkpoint, samples):
    status, out = compare_json(checkpoint, "--device", "cpu", "--dtype", "bfloat16", "--image", str(samples))
    report = out["comparison"]
    assert report["dtype"] == "bfloat16" and report["images"] == len(out["images"])
    # the deviation is real and of bf16's size, computed here without the project's statistics
    files = sorted(samples.glob("*.png"))
    x = torch.stack([preprocess(p) for p in files])
    model = load_model(checkpoint)
    with torch.inference_mode():
        ref = model(x)
        low = Recognizer(model, "cpu", torch.bfloat16).outputs(x)
    for name, r, o in zip(report["heads"], ref, low):
        head = report["heads"][name]
        assert 1e-3 < head["max_abs"] < 5
        assert head["max_abs"] == pytest.approx(float((o - r).abs().max()), rel=1e-3, abs=1e-4)
        cos = float(torch.nn.functional.cosine_similarity(r.flatten().double(), o.flatten().double(), dim=0))
        assert head["cosine"] == pytest.approx(cos, abs=1e-9)
        assert head["verdict"] == independent_verdict(head, 2.0**-8)
    verdict = "FAIL" if any(h["verdict"] == "FAIL" for h in report["heads"].values()) else "PASS"
    assert report["verdict"] == verdict and status == (1 if verdict == "FAIL" else 0)


def test_compare_float32_passes_with_tiny_deviation(random_checkpoint):
    status, out = compare_json(random_checkpoint, "--device", "cpu")
    assert status == 0 and out["comparison"]["verdict"] == "PASS"
    assert out["comparison"]["whole_number_agreement"] == 1.0
    assert all(h["max_abs"] < 1e-4 and h["cosine"] > 0.999999 for h in out["comparison"]["heads"].values())


def test_compare_fails_and_exits_1_when_the_device_is_off(tmp_path):
    """Logits in the thousands: bf16 rounding makes errors far above 1, which msprobe's rule fails."""
    model = random_model(seed=3)
    with torch.no_grad():
        for head in model.heads():
            head[0].weight.mul_(3e4)
    torch.save(model.state_dict(), tmp_path / "model-1.pth")
    result = run_cli("inference.py", "--whole-image", "--checkpoint", str(tmp_path), "--compare", "--dtype", "bfloat16")
    assert_no_traceback(result)
    assert result.returncode == 1
    assert "verdict: FAIL" in result.stdout and "max abs > 1" in result.stdout


def test_a_closed_pipe_ends_quietly(random_checkpoint):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "inference.py"), "--checkpoint", str(random_checkpoint), "--batch-size", "1",
         "--image", *[str(p) for p in sorted((ROOT / "examples").glob("*.png"))] * 20],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    first = proc.stdout.readline()  # like `| head -1`
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.wait(timeout=300)
    assert first.startswith(str(ROOT / "examples"))
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr


def _address_space_of_8_gib() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


@pytest.mark.slow
def test_a_batch_too_large_for_memory_is_one_line(random_checkpoint):
    # 120,000 images are 4.2 GB of input: more than the 8 GiB of address space left to the
    # process once torch is loaded, on any host (no reliance on the host refusing a huge request)
    result = run_cli("evaluation/eval_performance.py", "--checkpoint", str(random_checkpoint), "--devices", "cpu",
                     "--batch-sizes", "120000", "--warmup", "0", "--runs", "1", preexec_fn=_address_space_of_8_gib)
    assert_no_traceback(result)
    assert result.returncode == 1 and "out of memory" in result.stderr and "--batch-size" in result.stderr
