"""The defects an adversarial run found (issue #9), each through the real CLI in a subprocess:
the bad input gets one line naming it, the rest of the work goes on, nothing is lost."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from conftest import ROOT, assert_no_traceback, ctrl_c_default, run_cli
from digitstruct import write_digit_struct
from conftest import without_root_privilege

EXAMPLES = sorted((ROOT / "examples").glob("*.png"))


def png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height, with almost no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def read_lines(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.strip()]


# --- 1. a file name that is not UTF-8 ------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_prints_under_a_strict_utf8_stdout(random_checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(EXAMPLES[0], os.fsencode(folder) + b"/a-\xff\xfe.png")
    shutil.copy(EXAMPLES[1], folder / "b.png")
    result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--image", str(folder), env={"PYTHONIOENCODING": "utf-8:strict"})
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    lines = read_lines(result)
    assert len(lines) == 2 and "a-\\xff\\xfe.png" in lines[0] and lines[1].startswith(str(folder / "b.png"))
    result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--image", str(folder), "--json",
                     env={"PYTHONIOENCODING": "utf-8:strict"})
    assert result.returncode == 0 and len(json.loads(result.stdout)) == 2


# --- 2. label values eval_accuracy.py must not trust ---------------------------------------------


@pytest.fixture()
def labelled_folder(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for i, path in enumerate(EXAMPLES[:3]):
        shutil.copy(path, folder / f"{i}.png")
    return folder


def score(checkpoint: Path, folder: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """eval_accuracy.py on the folder: it must finish (no traceback) with a JSON report, exit 1
    when the report counts anything left out and 0 otherwise."""
    out = folder / "report.json"
    result = run_cli("evaluation/eval_accuracy.py", "--checkpoint", str(checkpoint), "--device", "cpu", "--data", str(folder), "--json", str(out))
    assert_no_traceback(result)
    report = json.loads(out.read_text())
    assert result.returncode == (1 if any(report["left_out"].values()) else 0), result.stderr
    return result, report


def test_eval_accuracy_leaves_out_labels_it_cannot_trust(random_checkpoint, labelled_folder):
    entries = [
        {"file": "0.png", "label": "12", "boxes": [[1, 1, 10, 10], [11, 1, 10, 10]]},
        {"file": "1.png", "label": "3", "boxes": [[float("nan"), 1, 10, 10]]},
        {"file": "1.png", "label": "3", "boxes": [[float("inf"), 1, 10, 10]]},
        {"file": "2.png", "label": "4", "boxes": [[-15000, -15000, 30000, 30000]]},
        {"file": 123, "label": "5"},
        {"file": "0.png", "label": "77"},
        {"file": "2.png", "label": "8"},
    ]
    (labelled_folder / "labels.json").write_text(json.dumps(entries))  # json writes NaN and Infinity
    result, data = score(random_checkpoint, labelled_folder)
    assert data["complete"] is True
    assert data["images_scored"] == 1  # 0.png; 2.png is refused for its box, then given twice
    assert data["left_out"] == {"unreadable labels": 5, "outside the data folder": 0, "more than 5 digits": 0, "image failed": 1}
    err = result.stderr
    assert "entry 2 (1.png) left out: a box holds NaN or Infinity" in err
    assert "entry 3 (1.png) left out: a box holds NaN or Infinity" in err
    assert "entry 5 left out: 'file' must be a file name, got 123" in err
    assert "entry 6 (0.png) left out: a second label for this file (first at entry 1)" in err
    assert "2.png: the digit boxes give a" in err and "boxes far larger than the image" in err


def test_digit_struct_with_nan_and_labels_out_of_range(random_checkpoint, labelled_folder):
    records = [
        ("0.png", [1, 2], [[1, 1, 10, 10], [11, 1, 10, 10]]),
        ("1.png", [float("nan")], [[1, 1, 10, 10]]),
        ("2.png", [3], [[1, float("nan"), 10, 10]]),
        ("1.png", [11], [[1, 1, 10, 10]]),
        ("2.png", [0], [[1, 1, 10, 10]]),
    ]
    write_digit_struct(labelled_folder / "digitStruct.mat", records)
    result, data = score(random_checkpoint, labelled_folder)
    assert data["images_scored"] == 1 and data["left_out"]["unreadable labels"] == 4
    assert result.stderr.count("digit labels must be whole numbers 1..10") == 3
    assert "record 3 (2.png) left out: ValueError: a box holds NaN or Infinity" in result.stderr


# --- 3. the decompression-bomb guard with several workers -----------------------------------------


def test_images_between_one_and_two_bomb_limits_are_always_refused(random_checkpoint, tmp_path):
    """100-megapixel PNGs sit between Pillow's warning (89.5 MP) and its error (179 MP): each must
    be refused from its header on every worker thread, with no Pillow warning printed."""
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(12):
        png_header(folder / f"big{i:02}.png", 10_000, 10_000)
    shutil.copy(EXAMPLES[0], folder / "zz-small.png")
    result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--image", str(folder), "--workers", "4", "--batch-size", "2")
    assert_no_traceback(result)
    assert result.stderr.count("is more than 89,478,485 pixels (a possible decompression bomb)") == 12, result.stderr
    assert "DecompressionBombWarning" not in result.stderr and "warn" not in result.stderr.lower()
    assert len(read_lines(result)) == 1


# --- 4. a FIFO among the inputs ------------------------------------------------------------------


def test_a_fifo_is_refused_not_waited_on(random_checkpoint, tmp_path):
    os.mkfifo(tmp_path / "x.png")
    result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--image", str(tmp_path / "x.png"), str(EXAMPLES[0]), timeout=120)
    assert_no_traceback(result)
    assert result.returncode == 1
    assert f"error: {tmp_path / 'x.png'}: not a regular file" in result.stderr
    assert len(read_lines(result)) == 1


# --- 5. junk checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"hello", b"PK\x03\x04" + bytes(50), bytes(range(256)) * 3, b"\x80\x02}q\x00."])
def test_a_junk_checkpoint_is_one_line(tmp_path, content):
    (tmp_path / "model-1.pth").write_bytes(content)
    result = run_cli("inference.py", "--checkpoint", str(tmp_path / "model-1.pth"))
    assert_no_traceback(result)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'model-1.pth'}: "), result.stderr


def test_a_fifo_named_as_a_checkpoint(tmp_path):
    os.mkfifo(tmp_path / "model-1.pth")
    result = run_cli("test_load.py", "--checkpoint", str(tmp_path / "model-1.pth"), timeout=120)
    assert_no_traceback(result)
    assert "not a regular file" in result.stdout + result.stderr


# --- 6, 7 and the labels' rough edges -------------------------------------------------------------


def test_a_csv_saved_by_excel_with_a_bom(random_checkpoint, labelled_folder):
    (labelled_folder / "labels.csv").write_bytes("file,number\n0.png,12\n1.png,03\n".encode("utf-8-sig"))
    result = run_cli("evaluation/eval_accuracy.py", "--checkpoint", str(random_checkpoint), "--device", "cpu", "--data", str(labelled_folder))
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert "| images scored | 2 |" in result.stdout


def test_numeric_labels_warn_and_a_folder_is_no_labels_file(random_checkpoint, labelled_folder):
    (labelled_folder / "labels.json").write_text('[{"file": "0.png", "label": 3}, {"file": "1.png", "label": "03"}]')
    result = run_cli("evaluation/eval_accuracy.py", "--checkpoint", str(random_checkpoint), "--device", "cpu", "--data", str(labelled_folder))
    assert result.returncode == 0, result.stderr
    assert "warning: " in result.stderr and "1 labels are JSON numbers, not strings" in result.stderr
    result = run_cli("evaluation/eval_accuracy.py", "--checkpoint", str(random_checkpoint), "--data", str(labelled_folder),
                     "--labels", str(labelled_folder))
    assert result.returncode == 2 and "is a folder, not a labels file" in result.stderr


# --- streamed JSON --------------------------------------------------------------------------------


def interrupt_when(path: Path, proc: subprocess.Popen, ready, limit: float = 120) -> None:
    end = time.time() + limit
    while time.time() < end and proc.poll() is None:
        if path.exists() and ready(path.read_text()):
            proc.send_signal(signal.SIGINT)
            return
        time.sleep(0.05)
    pytest.fail("the run never reached the point to interrupt")


@pytest.mark.parametrize("compare", [False, True])
def test_ctrl_c_leaves_valid_json_with_every_image_read(random_checkpoint, tmp_path, compare):
    out = tmp_path / "out.json"
    args = [sys.executable, str(ROOT / "inference.py"), "--checkpoint", str(random_checkpoint), "--batch-size", "1",
            "--json", str(out), "--image", *[str(p) for p in EXAMPLES] * 30] + (["--compare"] if compare else [])
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_default)
    interrupt_when(out, proc, lambda text: text.count('"image"') >= 3)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    data = json.loads(out.read_text())
    images = data if not compare else data["images"]
    assert len(images) >= 3 and all(r["number"] is not None for r in images)
    if compare:
        assert data["complete"] is False


def test_eval_accuracy_streams_its_json(random_checkpoint, labelled_folder):
    entries = [{"file": f"{i % 3}.png", "label": "1"} for i in range(3)]
    for i in range(3, 400):
        shutil.copy(labelled_folder / "0.png", labelled_folder / f"{i}.png")
        entries.append({"file": f"{i}.png", "label": "1"})
    (labelled_folder / "labels.json").write_text(json.dumps(entries[:3] + entries[3:]))
    out = labelled_folder / "report.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "evaluation/eval_accuracy.py"), "--checkpoint", str(random_checkpoint),
                             "--device", "cpu", "--data", str(labelled_folder), "--batch-size", "2", "--json", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_default)
    interrupt_when(out, proc, lambda text: text.count('"true_number"') >= 4)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    data = json.loads(out.read_text())
    assert data["complete"] is False and len(data["images"]) >= 4 and data["labels"].endswith("labels.json")


@pytest.mark.parametrize(
    "script, args",
    [
        ("inference.py", []),
        ("evaluation/eval_precision.py", ["--samples", "1"]),
        ("evaluation/eval_performance.py", ["--devices", "cpu", "--runs", "1"]),
    ],
)
def test_an_unwritable_json_path_is_found_before_any_work(random_checkpoint, tmp_path, script, args):
    bad = tmp_path / "no" / "such" / "dir" / "out.json"
    result = run_cli(script, "--checkpoint", str(random_checkpoint), *args, "--json", str(bad))
    assert_no_traceback(result)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"error: {bad}: cannot write the JSON output (No such file or directory)"


def test_eval_accuracy_checks_its_json_path_first(random_checkpoint, labelled_folder, tmp_path):
    (labelled_folder / "labels.json").write_text('[{"file": "0.png", "label": "1"}]')
    bad = tmp_path / "no" / "out.json"
    result = run_cli("evaluation/eval_accuracy.py", "--checkpoint", str(random_checkpoint), "--data", str(labelled_folder), "--json", str(bad))
    assert result.returncode == 2 and "cannot write the JSON output" in result.stderr and result.stdout == ""


# --- inputs' rough edges --------------------------------------------------------------------------


def test_dash_reads_one_image_from_stdin(random_checkpoint):
    with open(EXAMPLES[0], "rb") as f:
        result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--image", "-", stdin=f)
    assert result.returncode == 0, result.stderr
    assert read_lines(result)[0].startswith("-  ")


def test_folder_reads_skip_hidden_files(random_checkpoint, tmp_path):
    shutil.copy(EXAMPLES[0], tmp_path / "a.png")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (tmp_path / ".thumb.png").write_bytes(b"junk")
    result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--image", str(tmp_path))
    assert result.returncode == 0 and result.stderr.count("error") == 0, result.stderr
    assert len(read_lines(result)) == 1


def test_a_symlink_loop_says_so(random_checkpoint, tmp_path):
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--image", str(tmp_path / "loop.png"), str(EXAMPLES[0]))
    assert result.returncode == 1
    assert f"error: {tmp_path / 'loop.png'}: too many levels of symbolic links" in result.stderr


def test_a_glob_into_an_unreadable_folder_says_so(random_checkpoint, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    shutil.copy(EXAMPLES[0], locked / "a.png")
    os.chmod(locked, 0)
    try:
        result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--image", str(locked / "*.png"), str(EXAMPLES[0]),
                         prefix=without_root_privilege())
    finally:
        os.chmod(locked, 0o700)
    assert_no_traceback(result)
    assert f"error: {locked}: folder cannot be read (permission denied)" in result.stderr


def test_ctrl_c_while_torch_loads(random_checkpoint):
    proc = subprocess.Popen([sys.executable, str(ROOT / "inference.py"), "--checkpoint", str(random_checkpoint)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_default)
    time.sleep(0.4)  # python is up; `import torch` takes about a second more
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr and stderr.strip() == "interrupted", stderr


def test_nan_is_no_number_in_the_json(random_checkpoint):
    assert math.isnan(float("nan"))  # the JSON writer turns non-finite floats into null (cli.plain)
    result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--json", "--image", str(EXAMPLES[0]))
    assert "NaN" not in result.stdout and json.loads(result.stdout)[0]["confidence"] >= 0


def test_a_run_that_fails_after_opening_its_json_leaves_a_valid_document(labelled_folder, tmp_path):
    (labelled_folder / "labels.json").write_text('[{"file": "0.png", "label": "1"}]')
    out = tmp_path / "report.json"
    result = run_cli("evaluation/eval_accuracy.py", "--data", str(labelled_folder), "--checkpoint", str(tmp_path / "none.pth"), "--json", str(out))
    assert result.returncode == 2 and "no such file or folder" in result.stderr
    assert json.loads(out.read_text())["complete"] is False
