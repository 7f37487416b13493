"""The localizer and find-then-read, through the Python API and the CLI: its network and its
box encoding, the shipped weights on real SVHN full images, training it with the engine, every
script that runs it, and the bad checkpoints a user can hand it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import localizer as L
from conftest import ROOT, _env_path, assert_no_traceback, run_cli
from svhn.boxes import box_iou, corners, iou, letterbox, nms, union
from svhn.checkpoints import SHIPPED_LOCALIZER, load_localizer
from svhn.labels import labelled_set
from svhn.onnx_model import ATC_OPS
from svhn.synthetic import make_scene_set


@pytest.fixture(scope="session")
def full_images():
    """Real SVHN format-1 full images with digit boxes (labels.json)."""
    return _env_path("SVHN_FULL_IMAGES", "SVHN full images with boxes")


@pytest.fixture(scope="session")
def random_localizer(tmp_path_factory):
    """A localizer checkpoint of random weights (with non-trivial BatchNorm statistics)."""
    torch.manual_seed(0)
    model = L.Localizer().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("random-localizer") / "localizer-3.pth"
    torch.save(L.checkpoint(model), path)
    return path


# --------------------------------------------------------------------------------------------
# The network and its encoding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(L.ARCHS))
def test_every_architecture_is_small_and_gives_the_specs_outputs(arch):
    model = L.Localizer(arch).eval().requires_grad_(False)
    spec = L.spec(arch)
    heat, box = model(torch.zeros(2, 3, L.INPUT_SIZE, L.INPUT_SIZE))
    assert [tuple(heat.shape[1:]), tuple(box.shape[1:])] == [s for _, s in spec.outputs]
    assert float(heat.min()) >= 0 and float(heat.max()) <= 1  # the sigmoid is in the graph
    assert L.flops_per_image(arch) < 0.3e9
    # the count by hand agrees with torch's own FLOP counter for the convolutions
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, L.INPUT_SIZE, L.INPUT_SIZE))
    assert abs(counter.get_total_flops() - L.flops_per_image(arch)) / L.flops_per_image(arch) < 0.02


def perfect_outputs(boxes, arch=L.DEFAULT_ARCH):
    """The outputs a perfect localizer would give: the target heatmap, and at every cell the log
    distances to the box whose Gaussian is highest there (as a trained one predicts around a
    number)."""
    g = L.ARCHS[arch].grid
    stride = L.INPUT_SIZE / g
    heat = L.targets(boxes, arch)[:1]
    if not boxes:
        return heat.unsqueeze(0), torch.zeros(1, 4, g, g)
    gauss = torch.stack([L.targets([b], arch)[0] for b in boxes])
    corner = torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in boxes])[gauss.argmax(0)]  # g x g x 4
    centre = (torch.arange(g) + 0.5) * stride
    cx, cy = centre.view(1, g), centre.view(g, 1)
    d = torch.stack([cx - corner[..., 0], cy - corner[..., 1], corner[..., 2] - cx, corner[..., 3] - cy]).clamp(min=1e-3) / stride
    return heat.unsqueeze(0), torch.log(d).unsqueeze(0)


@pytest.mark.parametrize("arch", sorted(L.ARCHS))
def test_targets_decode_back_to_their_boxes(arch):
    boxes = [[20.0, 30.0, 50.0, 40.0], [100.0, 90.0, 30.0, 52.0]]
    found = L.decode(perfect_outputs(boxes, arch))[0]
    assert len(found) == 2
    for f in found:
        assert max(box_iou(f.box, b) for b in boxes) > 0.99
        assert f.score == pytest.approx(1.0)
    assert L.decode(perfect_outputs([], arch))[0] == []  # nothing there: nothing found


def test_the_loss_is_lowest_at_the_truth():
    boxes = [[20.0, 30.0, 50.0, 40.0]]
    target = L.targets(boxes).unsqueeze(0)
    heat, box = perfect_outputs(boxes)
    good, parts = L.loss((heat, box), target)
    bad, _ = L.loss((heat, box + 0.3), target)
    assert parts["box"] < 1e-3 and float(bad) > float(good)


def test_box_arithmetic():
    assert union([[10, 5, 4, 10], [15, 6, 5, 12]]) == [10.0, 5.0, 10.0, 13.0]
    a = corners(torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 10.0, 10.0], [50.0, 50.0, 2.0, 2.0]]))
    assert float(iou(a, a)[0, 1]) == pytest.approx(50 / 150)
    assert nms(a, torch.tensor([0.9, 0.8, 0.7]), 0.4) == [0, 1, 2]
    assert nms(a, torch.tensor([0.9, 0.8, 0.7]), 0.3) == [0, 2]
    assert nms(a, torch.tensor([0.7, 0.8, 0.9]), 0.3) == [2, 1]
    assert box_iou(None, [0, 0, 1, 1]) == 0.0


@pytest.mark.parametrize("size", [(140, 68), (38, 60), (833, 400), (1, 1), (160, 160)])
def test_the_letterbox_maps_boxes_back_to_the_photo(size):
    img = Image.new("RGB", size, (255, 0, 0))
    array, geometry = letterbox(img, L.INPUT_SIZE)
    assert array.shape == (L.INPUT_SIZE, L.INPUT_SIZE, 3)
    (ox, oy), (sw, sh) = geometry.offset, geometry.size
    assert (array[oy : oy + sh, ox : ox + sw] == (255, 0, 0)).all()  # the photo, exactly where the geometry says
    assert array.sum() == 255 * sw * sh + 128 * 3 * (L.INPUT_SIZE**2 - sw * sh)
    box = [size[0] * 0.25, size[1] * 0.1, size[0] * 0.5, size[1] * 0.8]
    assert geometry.to_photo(geometry.to_input(box)) == pytest.approx(box)
    assert geometry.to_photo([-50, -50, 1000, 1000]) == [0.0, 0.0, float(size[0]), float(size[1])]  # clipped to the photo


def test_the_exported_graph_is_on_atcs_list(random_localizer, tmp_path):
    result = run_cli("export.py", "--network", "localizer", "--localizer", str(random_localizer), "--output", str(tmp_path / "loc.onnx"),
                     "--samples", "8")
    assert result.returncode == 0, result.stderr
    proof = json.loads((tmp_path / "loc.onnx.json").read_text())
    assert proof["verdict"] == "PASS" and not proof["ops_not_on_atc_list"]
    assert set(proof["op_histogram"]) <= ATC_OPS
    assert list(proof["outputs"]) == ["heatmap", "box"]
    assert all(r["box_iou_min"] > 0.9999 for r in proof["parity"].values())
    fixed = run_cli("export.py", "--network", "localizer", "--localizer", str(random_localizer), "--output", str(tmp_path / "loc8.onnx"),
                    "--batch", "8", "--samples", "8")
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads((tmp_path / "loc8.onnx.json").read_text())["batch_dependent_ops"] == []


# --------------------------------------------------------------------------------------------
# Labels with several numbers, or none
# --------------------------------------------------------------------------------------------


def test_scene_labels_give_every_number_box(tmp_path):
    entries = [
        {"file": "two.png", "label": "12", "boxes": [[1, 1, 4, 8], [6, 1, 4, 8]], "numbers": [
            {"label": "12", "boxes": [[1, 1, 4, 8], [6, 1, 4, 8]]}, {"label": "7", "boxes": [[30, 2, 5, 9]]}]},
        {"file": "none.png", "label": "", "boxes": [], "numbers": []},
        {"file": "plain.png", "label": "5", "boxes": [[2, 2, 3, 6]]},
        {"file": "nobox.png", "label": "5"},
        {"file": "bad.png", "numbers": [{"label": "1"}]},
        {"file": "bad2.png", "numbers": "12"},
    ]
    (tmp_path / "labels.json").write_text(json.dumps(entries))
    found = labelled_set(tmp_path)
    by_file = {r.file: r for r in found.records}
    assert by_file["two.png"].number_boxes == [[1.0, 1.0, 9.0, 8.0], [30.0, 2.0, 5.0, 9.0]]
    assert by_file["two.png"].number == "12"
    assert by_file["none.png"].number_boxes == [] and by_file["none.png"].digits == []
    assert by_file["plain.png"].number_boxes == [[2.0, 2.0, 3.0, 6.0]]
    assert by_file["nobox.png"].number_boxes is None
    assert len(found.errors) == 2 and all("left out" in e for e in found.errors)
    assert "needs its digit boxes" in found.errors[0] and "bad2.png" in found.errors[1]


def test_scenes_hold_numbers_whose_digits_are_set_apart_and_out_of_line(tmp_path):
    """SVHN's numbers are often digits mounted one by one (apart, climbing a step): the scenes
    render such numbers, each digit's box inside the picture, every digit of a number boxed."""
    folder = make_scene_set(tmp_path / "scenes", 80, seed=2)
    apart = climbing = 0
    for entry in json.loads((folder / "labels.json").read_text()):
        w, h = Image.open(folder / entry["file"]).size
        for number in entry["numbers"]:
            boxes = number["boxes"]
            assert len(boxes) == len(number["label"])
            assert all(0 <= x and 0 <= y and x + bw <= w + 0.5 and y + bh <= h + 0.5 for x, y, bw, bh in boxes)
            for a, b in zip(boxes, boxes[1:]):
                tall = max(a[3], b[3])
                apart += b[0] - (a[0] + a[2]) > 0.3 * tall
                climbing += abs((b[1] + b[3] / 2) - (a[1] + a[3] / 2)) > 0.15 * tall
    assert apart >= 5 and climbing >= 3, (apart, climbing)


# --------------------------------------------------------------------------------------------
# The shipped localizer on real photos
# --------------------------------------------------------------------------------------------


def test_the_shipped_localizer_is_small_and_loads():
    assert SHIPPED_LOCALIZER.is_file(), "weights/localizer.pth is part of the repository"
    assert SHIPPED_LOCALIZER.stat().st_size < 5e6
    model = load_localizer(SHIPPED_LOCALIZER)
    assert model.arch_name in L.ARCHS
    log = [json.loads(line) for line in (SHIPPED_LOCALIZER.parent / "localizer-log.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in r for r in log)
    assert (SHIPPED_LOCALIZER.parent / "localizer-curves.png").is_file()


def test_find_reads_whole_svhn_photos_and_says_where(checkpoint, full_images, tmp_path):
    photos = sorted(full_images.glob("*.png"))[:24]
    result = run_cli("inference.py", "--find", "--checkpoint", str(checkpoint), "--image", *map(str, photos), "--json", str(tmp_path / "out.json"),
                     "--draw", str(tmp_path / "drawn"))
    assert result.returncode == 0, result.stderr
    records = json.loads((tmp_path / "out.json").read_text())
    assert [r["image"] for r in records] == [str(p) for p in photos]  # input order
    truth = {e["file"]: e for e in json.loads((full_images / "labels.json").read_text())}
    good = 0
    for r in records:
        t = truth[os.path.basename(r["image"])]
        assert set(r) >= {"number", "confidence", "box", "find_score", "found"}
        if r["box"] is not None:
            x, y, w, h = r["box"]
            assert 0 <= x and 0 <= y and x + w <= t["image_wh"][0] + 1e-6 and y + h <= t["image_wh"][1] + 1e-6  # the photo's own pixels
            good += box_iou(r["box"], union(t["boxes"])) >= 0.5
    assert good >= 0.6 * len(records)  # a regression guard only: the figures are eval_accuracy.py --find's
    drawn = sorted((tmp_path / "drawn").glob("*.png"))
    assert len(drawn) == len(photos) and drawn[0].name.startswith("00000-")
    assert Image.open(drawn[0]).size[0] >= 320


def test_nothing_found_reads_dash_and_says_so(checkpoint, tmp_path):
    Image.new("RGB", (200, 100), (128, 128, 128)).save(tmp_path / "wall.png")
    Image.new("RGB", (3, 3), (10, 200, 10)).save(tmp_path / "tiny.png")
    result = run_cli("inference.py", "--find", "--checkpoint", str(checkpoint), "--image", str(tmp_path / "wall.png"), str(tmp_path / "tiny.png"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[1] == "-" and "no number found" in lines[0]
    assert "no house number found" in result.stderr
    assert "too small" in result.stderr and "tiny.png" in result.stderr
    as_json = run_cli("inference.py", "--find", "--checkpoint", str(checkpoint), "--image", str(tmp_path / "wall.png"), "--json")
    record = json.loads(as_json.stdout)[0]
    assert record["box"] is None and record["find_score"] is None and record["number"] == ""


def test_whole_image_is_the_published_read(checkpoint, samples):
    """--whole-image reads as the published demo: the stand-in's own table of readings."""
    result = run_cli("inference.py", "--whole-image", "--checkpoint", str(checkpoint), "--image", str(samples / "plaque-503.png"), "--json")
    record = json.loads(result.stdout)[0]
    assert record["number"] == "503" and "box" not in record


def test_eval_accuracy_find_puts_the_rows_side_by_side(checkpoint, full_images, tmp_path):
    result = run_cli("evaluation/eval_accuracy.py", "--data", str(full_images), "--find", "--limit", "16", "--checkpoint", str(checkpoint),
                     "--json", str(tmp_path / "acc.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "acc.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert {"true boxes", "found boxes", "whole image"} <= set(rows)
    assert all(r["images"] == 16 for r in rows.values())
    assert rows["true boxes"]["of_true_boxes"] == 1.0
    loc = report["localizer"]
    assert loc["images_with_true_boxes"] == 16 and 0 <= loc["iou_at_least_0.7"] <= loc["iou_at_least_0.5"] <= 1
    per_image = report["images"]
    assert report["accuracy"] == pytest.approx(sum(p["correct"] for p in per_image) / 16)
    assert loc["mean_iou"] == pytest.approx(sum(p["iou"] for p in per_image) / 16)
    assert "| found boxes | 16 |" in result.stdout and "IoU >= 0.5" in result.stdout
    try:
        import rapidocr_onnxruntime  # noqa: F401
    except ImportError:
        assert "RapidOCR" not in rows
    else:
        assert rows["RapidOCR"]["images"] == 16


# --------------------------------------------------------------------------------------------
# The same machinery as the recognizer
# --------------------------------------------------------------------------------------------


def test_compare_covers_the_localizer_and_the_final_readings(checkpoint, samples):
    result = run_cli("inference.py", "--find", "--compare", "--checkpoint", str(checkpoint), "--image", str(samples), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["comparison"]
    assert report["verdict"] == "PASS"
    assert report["localizer"]["network"] == "localizer" and report["localizer"]["box_iou_min"] > 0.9999
    assert set(report["localizer"]["heads"]) == {"heatmap", "box"}
    assert report["final_readings_agree"] == report["photos"] == len(list(samples.glob("*.png")))


def test_onnx_runs_both_networks_and_reads_as_pytorch(checkpoint, samples, tmp_path):
    for network, name in (("recognizer", "rec.onnx"), ("localizer", "loc.onnx")):
        assert run_cli("export.py", "--network", network, "--checkpoint", str(checkpoint), "--output", str(tmp_path / name), "--samples", "4").returncode == 0
    torch_run = run_cli("inference.py", "--find", "--checkpoint", str(checkpoint), "--image", str(samples), "--json")
    onnx_run = run_cli("inference.py", "--find", "--onnx", str(tmp_path / "loc.onnx"), str(tmp_path / "rec.onnx"), "--image", str(samples), "--json")
    assert onnx_run.returncode == 0, onnx_run.stderr
    a, b = json.loads(torch_run.stdout), json.loads(onnx_run.stdout)
    assert [r["number"] for r in a] == [r["number"] for r in b]
    for x, y in zip(a, b):
        assert (x["box"] is None) == (y["box"] is None)
        if x["box"]:
            assert box_iou(x["box"], y["box"]) > 0.999
    missing = run_cli("inference.py", "--find", "--onnx", str(tmp_path / "rec.onnx"), "--image", str(samples))
    assert missing.returncode == 2 and "no localizer among" in missing.stderr and "--network localizer" in missing.stderr


def test_test_load_checks_a_localizer(random_localizer, checkpoint):
    ok = run_cli("test_load.py", "--network", "localizer", "--localizer", str(random_localizer))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "4/4 checks passed" in ok.stdout
    recognizer_file = next(checkpoint.glob("model-*.pth")) if checkpoint.is_dir() else checkpoint
    wrong = run_cli("test_load.py", "--network", "localizer", "--localizer", str(recognizer_file))
    assert wrong.returncode == 1 and "this is the recognizer's checkpoint" in wrong.stdout
    folder = run_cli("test_load.py", "--network", "localizer", "--localizer", str(recognizer_file.parent))
    assert folder.returncode == 2 and "no localizer-<step>.pth" in folder.stderr and "pass that as --checkpoint" in folder.stderr


def test_eval_performance_times_both_networks_and_the_pipeline(random_checkpoint, random_localizer, samples, tmp_path):
    result = run_cli("evaluation/eval_performance.py", "--devices", "cpu", "--checkpoint", str(random_checkpoint), "--localizer", str(random_localizer),
                     "--batch-sizes", "1", "4", "--warmup", "1", "--runs", "3", "--pipeline", str(samples), "--pipeline-images", "20",
                     "--json", str(tmp_path / "perf.json"))
    assert result.returncode == 0, result.stderr
    perf = json.loads((tmp_path / "perf.json").read_text())
    assert sorted(d["network"] for d in perf["devices"]) == ["localizer", "recognizer"]
    ratio = perf["localizer_over_recognizer"]
    assert [r["batch_size"] for r in ratio] == [1, 4] and all(r["localizer_over_recognizer"] > 0 for r in ratio)
    (p,) = perf["pipeline"]
    assert p["images"] == 20 and p["loader_images_per_s"] > 0 and p["pipeline_images_per_s"] > 0
    assert 0 <= p["localizer_share"] <= 1 and 0 <= p["recognizer_share"] <= 1
    assert "Find, then read, from image files" in result.stdout and "localizer ms" in result.stdout


@pytest.mark.slow
def test_torchrun_shards_find_and_rank_0_writes_one_json_in_order(checkpoint, full_images, tmp_path):
    photos = [str(p) for p in sorted(full_images.glob("*.png"))[:10]]
    one = run_cli("inference.py", "--find", "--checkpoint", str(checkpoint), "--image", *photos, "--json", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(ROOT / "inference.py"), "--find",
                          "--device", "cpu", "--checkpoint", str(checkpoint), "--image", *photos, "--json", str(tmp_path / "two.json")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert two.returncode == 0, two.stderr
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert [r["image"] for r in b] == photos
    assert [(r["number"], r["box"]) for r in a] == [(r["number"], r["box"]) for r in b]


# --------------------------------------------------------------------------------------------
# Training it with the engine
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_localizer_writes_checkpoints_inference_can_use_and_resumes(checkpoint, full_images, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--task", "localizer", "--data", str(full_images), "--synthetic", "60", "--init", "scratch", "--batch-size", "8",
              "--val-every", "10", "--cache", str(cache), "--device", "cpu", "--out", str(out)]
    first = run_cli("train.py", *common, "--steps", "20")
    assert first.returncode == 0, first.stderr
    assert_no_traceback(first)
    saved = sorted(out.glob("localizer-*.pth"))
    assert saved and (out / "curves.png").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {r["step"] for r in log if "val_accuracy" in r} == {10, 20}
    assert all(set(r["loss_per_head"]) == {"heatmap", "box"} for r in log if "loss" in r)
    lr = {r["step"]: r["lr"] for r in log if "lr" in r}  # the localizer's cosine: half way at step 10, zero at the end
    assert lr[10] == pytest.approx(0.001, rel=0.01) and lr[20] < 1e-9
    labels = json.loads(next(cache.glob("scenes-*/labels.json")).read_text())
    assert len(labels) == 60 and any(not e["numbers"] for e in labels) and any(len(e["numbers"]) == 1 for e in labels)
    # the checkpoint is the localizer's format, read by inference
    use = run_cli("inference.py", "--find", "--checkpoint", str(checkpoint), "--localizer", str(out), "--image", str(sorted(full_images.glob("*.png"))[0]))
    assert use.returncode == 0, use.stderr
    # resume goes on with the localizer task without being told again
    more = run_cli("train.py", "--resume", "--out", str(out), "--steps", "30", "--cache", str(cache))
    assert more.returncode == 0, more.stderr
    assert max(json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()) == 30


@pytest.mark.slow
def test_the_ema_is_what_is_checkpointed_and_resumes_exactly(full_images, tmp_path):
    """AdamW with an EMA of the weights (the localizer's recipe): the checkpoint holds the EMA,
    not the raw weights, and a resumed run ends with the same weights, EMA and optimizer state as
    a straight one (a step schedule, so that the resumed run's schedule is the straight one's)."""
    cache = tmp_path / "cache"
    common = ["--task", "localizer", "--data", str(full_images), "--init", "scratch", "--batch-size", "4", "--optimizer", "adamw",
              "--schedule", "step", "--ema", "0.9", "--seed", "3", "--cache", str(cache), "--device", "cpu"]
    for args in (["--out", str(tmp_path / "straight"), "--steps", "6", "--val-every", "6"],
                 ["--out", str(tmp_path / "resumed"), "--steps", "3", "--val-every", "3"],
                 ["--out", str(tmp_path / "resumed"), "--resume", "--steps", "6"]):
        result = run_cli("train.py", *common, *args) if "--resume" not in args else run_cli("train.py", *args, "--cache", str(cache))
        assert result.returncode == 0, result.stderr
    a = torch.load(tmp_path / "straight" / "training_state.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "training_state.pt", weights_only=True)
    assert a["step"] == b["step"] == 6 and a["args"]["recipe"]["optimizer"] == "adamw"
    assert a["args"]["recipe"]["schedule"] == "step"  # given, so it wins over the localizer's default (cosine), though it is the recognizer's
    for key in ("model", "ema"):
        assert [k for k in a[key] if not torch.equal(a[key][k], b[key][k])] == [], key
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(), b["optimizer"]["state"][0].values()))
    saved = torch.load(tmp_path / "straight" / "localizer-6.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], a["ema"][k]) for k in saved)
    assert any(not torch.equal(saved[k], a["model"][k]) for k in saved if saved[k].is_floating_point())


@pytest.mark.slow
def test_val_folds_hold_out_every_photo_once_and_resume_keeps_theirs(full_images, tmp_path):
    """--val-fold K: the K-th of the seeded --val-fraction folds is held out (cross-validation);
    fold 0 is the plain --val-fraction split, a resumed run keeps its fold, and a fold past the
    last one or beside --val DIR is one line."""
    common = ["--task", "localizer", "--data", str(full_images), "--init", "scratch", "--batch-size", "2", "--steps", "1",
              "--val-every", "1", "--val-fraction", "0.5", "--cache", str(tmp_path / "cache"), "--device", "cpu"]

    def held_out(out):
        return [e["file"] for e in json.loads((out / f"validation-{full_images.name}.json").read_text())]

    folds = []
    for k in ("0", "1"):
        result = run_cli("train.py", *common, "--val-fold", k, "--out", str(tmp_path / k))
        assert result.returncode == 0, result.stderr
        folds.append(held_out(tmp_path / k))
    plain = run_cli("train.py", *common, "--out", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    every = [r.file for r in labelled_set(full_images).records]
    assert held_out(tmp_path / "plain") == folds[0]
    assert not set(folds[0]) & set(folds[1]) and sorted(folds[0] + folds[1]) == sorted(every)
    resumed = run_cli("train.py", "--resume", "--out", str(tmp_path / "1"), "--steps", "2", "--cache", str(tmp_path / "cache"))
    assert resumed.returncode == 0, resumed.stderr
    assert held_out(tmp_path / "1") == folds[1]
    for args, words in ((["--val-fold", "2", "--out", str(tmp_path / "2")], "--val-fold 2"),
                        (["--val-fold", "1", "--val", str(full_images), "--out", str(tmp_path / "3")], "--val-fold")):
        bad = run_cli("train.py", *common, *args)
        assert bad.returncode == 2 and words in bad.stderr
        assert_no_traceback(bad)


def test_train_localizer_benchmark():
    result = run_cli("train.py", "--task", "localizer", "--benchmark", "--device", "cpu", "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    bench = json.loads(result.stdout)
    assert bench["task"] == "localizer" and bench["images_per_s"] > 0


# --------------------------------------------------------------------------------------------
# Bad checkpoints
# --------------------------------------------------------------------------------------------


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.fixture()
def bad_localizers(tmp_path, random_localizer):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 16)  # fixed bytes: the same message on every run
    code = tmp_path / "code.pth"
    torch.save({"format": L.FORMAT, "payload": Payload()}, code)
    other = tmp_path / "other-arch.pth"
    obj = torch.load(random_localizer, weights_only=True)
    torch.save({**obj, "arch": "huge-s2"}, other)
    nan = tmp_path / "nan.pth"
    obj["state_dict"] = {k: (torch.full_like(v, math.nan) if v.is_floating_point() else v) for k, v in obj["state_dict"].items()}
    torch.save(obj, nan)
    plain = tmp_path / "plain.pth"
    torch.save({"a": torch.zeros(2)}, plain)
    return {"missing": (tmp_path / "nope.pth", "no such file"), "junk": (junk, "PyTorch checkpoint"),
            "code": (code, "refused, it holds pickled Python code"), "arch": (other, "unknown localizer architecture"),
            "nan": (nan, "NaN or Inf"), "plain": (plain, "not a localizer checkpoint")}


@pytest.mark.parametrize("kind", ["missing", "junk", "code", "arch", "nan", "plain"])
def test_a_bad_localizer_is_one_line_naming_it(checkpoint, samples, bad_localizers, kind):
    path, words = bad_localizers[kind]
    result = run_cli("inference.py", "--find", "--checkpoint", str(checkpoint), "--localizer", str(path), "--image", str(samples / "plaque-6.png"))
    assert result.returncode == 2, result.stderr
    assert_no_traceback(result)
    assert "pickled code ran" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0] and path.name in errors[0]


def test_each_networks_file_given_as_the_other_is_named(checkpoint, random_localizer, samples):
    image = str(samples / "plaque-6.png")
    recognizer_file = next(checkpoint.glob("model-*.pth")) if checkpoint.is_dir() else checkpoint
    as_localizer = run_cli("inference.py", "--find", "--checkpoint", str(checkpoint), "--localizer", str(recognizer_file), "--image", image)
    assert as_localizer.returncode == 2 and "this is the recognizer's checkpoint" in as_localizer.stderr and "--checkpoint" in as_localizer.stderr
    as_recognizer = run_cli("inference.py", "--whole-image", "--checkpoint", str(random_localizer), "--image", image)
    assert as_recognizer.returncode == 2 and "this is a localizer checkpoint" in as_recognizer.stderr and "--localizer" in as_recognizer.stderr
    assert_no_traceback(as_localizer)
    assert_no_traceback(as_recognizer)
