"""The evaluation scripts end to end on the CPU with small counts, the digitStruct.mat reader
against the real layout, and the precision figures against a hand computation."""

from __future__ import annotations

import json
import math
import shutil
import timeit
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_no_traceback, run_cli
from digitstruct import write_digit_struct
from model import SPEC
from svhn import deviation
from svhn.checkpoints import load_model
from svhn.labels import LabelError, Record, read_digit_struct, read_labels_file

# --- deviation statistics, by hand ------------------------------------------------------------


def test_deviation_figures_by_hand():
    ref = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = torch.tensor([[1.0, 2.5], [3.0, 4.0]])
    s = deviation.head_stats(ref, out)
    # |d| = [0, 0.5, 0, 0]
    assert s["mean_abs"] == pytest.approx(0.125)
    assert s["median_abs"] == pytest.approx(0.0)
    assert s["max_abs"] == pytest.approx(0.5)
    assert s["max_rel"] == pytest.approx(0.25)  # 0.5 / 2
    assert s["p99_abs"] == pytest.approx(0.5 * 0.97)  # linear interpolation between 0 and 0.5 at 99 %
    # cosine = (1 + 5 + 9 + 16) / (sqrt(30) * sqrt(1 + 6.25 + 9 + 16))
    assert s["cosine"] == pytest.approx(31 / math.sqrt(30 * 32.25), abs=1e-12)
    assert (s["worst_image"], s["worst_class"]) == (0, 1)
    assert s["argmax_agreement"] == 1.0
    assert s["max_abs_over_range"] == pytest.approx(0.5 / 4)
    # 0.5 > 1e-3 but cosine 0.9983 >= 0.99: msprobe's rule passes; bf16's 4u = 1/64 of the range fails
    assert deviation.failed_rules(s, torch.float32) == []
    assert len(deviation.failed_rules(s, torch.bfloat16)) == 1


def test_each_rule_can_fail():
    base = {"nonfinite": 0, "max_abs": 1e-4, "cosine": 1.0, "max_abs_over_range": 1e-6}
    assert deviation.failed_rules(base) == []
    assert deviation.failed_rules({**base, "nonfinite": 1}) == ["NaN/Inf in the output"]
    assert deviation.failed_rules({**base, "cosine": 0.85}) == ["cosine < 0.9"]
    assert deviation.failed_rules({**base, "max_abs": 1.5, "max_abs_over_range": 1e-6}) == ["max abs > 1"]
    assert deviation.failed_rules({**base, "cosine": 0.985, "max_abs": 2e-3}) == ["cosine < 0.99 and max abs > 1e-3"]
    assert deviation.failed_rules({**base, "cosine": 0.985, "max_abs": 5e-4}) == []
    assert deviation.failed_rules({**base, "max_abs_over_range": 0.01}, torch.float16) != []
    assert deviation.failed_rules({**base, "max_abs_over_range": 0.01}, torch.bfloat16) == []


def test_nan_fails():
    ref = torch.ones(2, 3)
    out = ref.clone()
    out[1, 2] = float("nan")
    report = deviation.compare([ref] * 6, [out] * 6, SPEC)
    assert report["verdict"] == "FAIL" and report["heads"]["length"]["nonfinite"] == 1


# --- eval_precision.py ------------------------------------------------------------------------


def all_filled(obj, path="") -> list[str]:
    """Paths of the None values in a JSON tree (a figure left empty)."""
    if obj is None:
        return [path]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in all_filled(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in all_filled(v, f"{path}[{i}]")]
    return []


def test_eval_precision_end_to_end(random_checkpoint, tmp_path):
    out = tmp_path / "precision.json"
    result = run_cli("evaluation/eval_precision.py", "--checkpoint", str(random_checkpoint), "--device", "cpu",
                     "--samples", "8", "--batch-size", "3", "--json", str(out))
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert "| length |" in result.stdout and "verdict: PASS" in result.stdout
    assert "8 random images (seed 0) + 9 real images" in result.stdout
    data = json.loads(out.read_text())
    assert all_filled(data) == []
    assert data["report"]["images"] == 17 and data["inputs"] == {"random": 8, "seed": 0, "real": 9, "unreadable": 0}
    assert set(data["report"]["heads"]) == {"length", "digit1", "digit2", "digit3", "digit4", "digit5"}
    assert data["environment"]["torch"] == torch.__version__
    for head in data["report"]["heads"].values():
        assert {"mean_abs", "median_abs", "p99_abs", "max_abs", "max_rel", "cosine", "argmax_agreement",
                "worst_image_name", "worst_class", "verdict"} <= set(head)


def test_eval_precision_bfloat16_and_seed(checkpoint, tmp_path):
    runs = []
    for seed in ("1", "1", "2"):
        out = tmp_path / f"p{len(runs)}.json"
        result = run_cli("evaluation/eval_precision.py", "--checkpoint", str(checkpoint), "--dtype", "bfloat16",
                         "--device", "cpu", "--samples", "8", "--seed", seed, "--images", "--json", str(out))
        assert_no_traceback(result)
        runs.append(json.loads(out.read_text())["report"])
    assert runs[0]["heads"]["length"]["max_abs"] > 0
    assert runs[0]["heads"] == runs[1]["heads"]  # same seed, same figures
    assert runs[0]["heads"]["length"]["max_abs"] != runs[2]["heads"]["length"]["max_abs"]


# --- eval_performance.py ----------------------------------------------------------------------


def sgemm_gflops() -> float:
    """This machine's 2048^3 torch.mm rate, measured here, independently of the script."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    best = min(timeit.repeat(lambda: torch.mm(a, b), number=1, repeat=5))
    return 2 * 2048**3 / best / 1e9


def test_eval_performance_end_to_end(random_checkpoint, tmp_path):
    out = tmp_path / "perf.json"
    result = run_cli("evaluation/eval_performance.py", "--checkpoint", str(random_checkpoint), "--devices", "cpu",
                     "--batch-sizes", "1", "2", "--warmup", "3", "--runs", "5", "--cpu-roofline", "--network", "recognizer", "--no-pipeline",
                     "--json", str(out))
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert "| batch | cold start ms |" in result.stdout and "fp32 peak (best of the two)" in result.stdout
    data = json.loads(out.read_text())
    assert data["complete"] is True
    (cpu,) = data["devices"]
    assert cpu["device"] == "cpu" and cpu["settings"]["kernels"]  # the report names what ran
    assert [r["batch_size"] for r in cpu["rows"]] == [1, 2]
    for row in cpu["rows"]:
        times = np.array(row["times_ms"])
        assert len(times) == 5
        # the summary is the raw timings' statistics, not some other figure
        assert row["mean_ms"] == pytest.approx(times.mean()) and row["p50_ms"] == pytest.approx(np.median(times))
        assert row["min_ms"] == pytest.approx(times.min()) and row["p99_ms"] <= times.max() + 1e-9
        assert row["images_per_s"] == pytest.approx(row["batch_size"] / (times.mean() / 1e3))
        assert row["peak_memory_mb"] is None  # the CPU has no device allocator to ask
    roof = data["cpu_roofline"]
    # the script's sgemm rate is this machine's, within a factor of 3 either way (noise), not a
    # product of the wrong size or count
    here = sgemm_gflops()
    assert here / 3 < roof["sgemm_2048_gflops"] < here * 3, (roof["sgemm_2048_gflops"], here)
    assert roof["largest_conv"] == {"side": 16, "cin": 160, "cout": 192}
    assert roof["fp32_peak_gflops"] == max(roof["sgemm_2048_gflops"], roof["largest_conv_b16_gflops"])
    assert roof["b16_fraction_of_peak"] == pytest.approx(roof["default_b16_gflops"] / roof["fp32_peak_gflops"])
    assert roof["default_b16_gflops"] == pytest.approx(roof["default_b16_images_per_s"] * 1.5874, rel=1e-3)
    assert data["machine"]["cpu_cores"] >= 1 and data["machine"]["torch_threads"] >= 1
    assert all_filled({k: v for k, v in data.items() if k != "devices"}) == []


# --- eval_accuracy.py: labels ------------------------------------------------------------------


def test_digit_struct_reader(tmp_path):
    records = [
        ("1.png", [1, 9], [[246.0, 77.0, 81.0, 219.0], [323.0, 81.0, 96.0, 219.0]]),
        ("2.png", [10], [[77.0, 29.0, 23.0, 32.0]]),
        ("3.png", [2, 10, 3], [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]]),
    ]
    write_digit_struct(tmp_path / "digitStruct.mat", records)
    got, errors, warnings = read_digit_struct(tmp_path / "digitStruct.mat")
    assert errors == [] and warnings == []
    assert got == [
        Record("1.png", [1, 9], records[0][2]),
        Record("2.png", [0], records[1][2]),
        Record("3.png", [2, 0, 3], records[2][2]),
    ]
    assert got[2].number == "203"


def test_digit_struct_that_is_not_one(tmp_path):
    (tmp_path / "fake.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    with pytest.raises(LabelError, match="not an HDF5 file"):
        read_digit_struct(tmp_path / "fake.mat")
    import h5py

    with h5py.File(tmp_path / "other.mat", "w") as f:
        f.create_dataset("x", data=[1, 2])
    with pytest.raises(LabelError, match="no digitStruct group"):
        read_digit_struct(tmp_path / "other.mat")


def test_labels_files(tmp_path):
    (tmp_path / "l.csv").write_text('file,number,boxes\na.png,042,"[[1,2,3,4],[5,6,7,8],[9,9,9,9]]"\nb.png,7,\nc.png,x1,\n')
    records, errors, _ = read_labels_file(tmp_path / "l.csv")
    assert records == [Record("a.png", [0, 4, 2], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]), Record("b.png", [7], None)]
    assert len(errors) == 1 and "entry 3" in errors[0]
    (tmp_path / "l.json").write_text('[{"file": "a.png", "label": "12", "boxes": [[1, 2, 3, 4]]}]')
    records, errors, _ = read_labels_file(tmp_path / "l.json")
    assert records == [] and "1 boxes for 2 digits" in errors[0]


# --- eval_accuracy.py: end to end ----------------------------------------------------------------


def independent_crop(img: Image.Image, boxes) -> np.ndarray:
    """The published crop, written out again here: truncated boxes, union, square, +30 %."""
    b = [[int(v) for v in box] for box in boxes]
    x0, y0 = min(v[0] for v in b), min(v[1] for v in b)
    x1, y1 = max(v[0] + v[2] for v in b), max(v[1] + v[3] for v in b)
    side = max(x1 - x0, y1 - y0)
    left, top = (x0 + x1) / 2 - side / 2, (y0 + y1) / 2 - side / 2
    l, t, s = round(left - 0.15 * side), round(top - 0.15 * side), round(1.3 * side)
    small = img.convert("RGB").crop((l, t, l + s, t + s)).resize((64, 64))
    return np.asarray(small)[5:59, 5:59]


def independent_accuracy(model, folder: Path, records) -> tuple[int, int]:
    """(correct, scored) by the five digit heads, counted here without the project's scoring."""
    correct = 0
    for name, labels, boxes in records:
        arr = independent_crop(Image.open(folder / name), boxes).astype(np.float32) / 255
        x = torch.from_numpy(((arr - 0.5) / 0.5).transpose(2, 0, 1).copy())[None]
        with torch.inference_mode():
            heads = model(x)
        digits = [int(h.argmax()) for h in heads[1:]]
        target = [0 if v == 10 else v for v in labels] + [10] * (5 - len(labels))
        correct += digits == target
    return correct, len(records)


@pytest.fixture()
def svhn_folder(tmp_path, samples, sample_labels) -> tuple[Path, list]:
    """A small SVHN-format-1 folder: real photos with their boxes, plus the bad cases."""
    folder = tmp_path / "test"
    folder.mkdir()
    good = []
    for i, s in enumerate(sample_labels):
        name = f"{i + 1}.png"
        shutil.copy(samples / s["file"], folder / name)
        w, h = Image.open(folder / name).size
        boxes = s["boxes"] or [[w * 0.1, h * 0.1, w * 0.8, h * 0.8]] * len(s["label"])
        labels = [10 if c == "0" else int(c) for c in s["label"]]
        good.append((name, labels, boxes))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(folder / "1.png", folder / "far.png")
    bad = [
        ("missing.png", [1], [[1, 1, 5, 5]]),
        ("broken.png", [2], [[1, 1, 5, 5]]),
        ("far.png", [3], [[5000, 5000, 10, 10]]),
        ("1.png", [1, 2, 3, 4, 5, 6], [[1, 1, 5, 5]] * 6),
    ]
    write_digit_struct(folder / "digitStruct.mat", good + bad)
    return folder, good


def test_eval_accuracy_end_to_end(checkpoint, svhn_folder, tmp_path):
    folder, good = svhn_folder
    out, sheet = tmp_path / "acc.json", tmp_path / "sheet.png"
    result = run_cli("evaluation/eval_accuracy.py", "--checkpoint", str(checkpoint), "--data", str(folder),
                     "--device", "cpu", "--batch-size", "4", "--errors", "3", "--sheet", str(sheet), "--json", str(out))
    assert_no_traceback(result)
    assert result.returncode == 1, result.stderr  # images were left out, which the report counts
    data = json.loads(out.read_text())
    correct, scored = independent_accuracy(load_model(checkpoint), folder, good)
    assert data["images_scored"] == scored == len(good)
    assert data["accuracy"] == pytest.approx(correct / scored)
    assert 0 < data["accuracy"] < 1
    assert data["left_out"] == {"unreadable labels": 0, "outside the data folder": 0, "more than 5 digits": 1, "image failed": 3}
    for name, words in (("missing.png", "no such file"), ("broken.png", "not an image"), ("far.png", "outside the")):
        assert any(name in line and words in line for line in result.stderr.splitlines()), (name, result.stderr)
    rows = {p["file"]: p for p in data["images"]}
    assert set(rows) == {g[0] for g in good}
    assert rows["10.png"]["true_number"] == "19" and rows["10.png"]["number"] == "19"  # svhn-train-1 with its boxes
    assert all(set(p) >= {"file", "true_number", "number", "length", "digits", "confidence"} for p in data["images"])
    assert data["accuracy_strict"] <= data["accuracy"]
    assert sum(v["images"] for v in data["accuracy_by_length"].values()) == scored
    assert "most confident first" in result.stdout
    # the sheet shows the three most confident misreads, each the crop that was read, at 2x
    misread = sorted((p for p in data["images"] if not p["correct"]), key=lambda p: -p["confidence"])[:3]
    assert len(misread) == 3
    picture = Image.open(sheet).convert("RGB")
    assert picture.size == (3 * 120, 139 + 12)  # one line of file name: the names here are short
    boxes = {name: b for name, _, b in good}
    for i, p in enumerate(misread):
        want = Image.fromarray(independent_crop(Image.open(folder / p["file"]), boxes[p["file"]])).resize((108, 108), Image.NEAREST)
        cell = picture.crop((i * 120 + 6, 4, i * 120 + 6 + 108, 4 + 108))
        assert np.array_equal(np.asarray(cell), np.asarray(want)), p["file"]


def test_eval_accuracy_without_boxes_reads_whole_images(checkpoint, svhn_folder, tmp_path):
    folder, _ = svhn_folder
    out = tmp_path / "whole.json"
    result = run_cli("evaluation/eval_accuracy.py", "--checkpoint", str(checkpoint), "--data", str(folder),
                     "--no-boxes", "--json", str(out))
    assert result.returncode == 1, result.stderr  # images were left out, which the report counts
    rows = {p["file"]: p for p in json.loads(out.read_text())["images"]}
    assert rows["10.png"]["number"] == "79"  # the whole svhn-train-1 photo misreads, as inference.py does


def test_eval_accuracy_bad_labels(random_checkpoint, tmp_path):
    (tmp_path / "nolabels").mkdir()
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "digitStruct.mat").write_text("not hdf5")
    for folder, words in (("nolabels", "no labels (digitStruct.mat, labels.json, labels.csv)"), ("fake", "not an HDF5 file")):
        result = run_cli("evaluation/eval_accuracy.py", "--checkpoint", str(random_checkpoint), "--data", str(tmp_path / folder))
        assert_no_traceback(result)
        assert result.returncode == 2 and words in result.stderr and str(tmp_path / folder) in result.stderr


def test_eval_accuracy_on_a_labels_file(checkpoint, samples, tmp_path):
    out = tmp_path / "samples.json"
    result = run_cli("evaluation/eval_accuracy.py", "--checkpoint", str(checkpoint), "--data", str(samples), "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    # the stand-in's README: 9 of 15 whole images, and both svhn-train photos with their boxes
    assert data["images_scored"] == 15 and round(data["accuracy"] * 15) == 11
