"""Nothing lost, nothing read that should not be (issue #16): labels that name files outside
their folder, damaged training states, two runs in one --out, a reused --out, full and read-only
disks, SIGTERM, leftovers of killed writes, fine-tunes that only unlearn, and the rough edges of
inference and evaluation. Each through the real CLI in a subprocess."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, assert_no_traceback, run_cli
from digitstruct import write_digit_struct
from svhn.synthetic import make_set

EXAMPLES = sorted((ROOT / "examples").glob("*.png"))


def train_cli(out: Path, cache: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_cli("train.py", "--device", "cpu", "--out", str(out), "--cache", str(cache), *args, **kwargs)


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file in a folder with its size and modification time: what a refused run must not change."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert_no_traceback(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small (or read-only) file system at `path`: root can mount one (CI runs as root)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode != 0:
        pytest.skip("this machine does not let root mount a tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("safety-cache")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return make_set(tmp_path_factory.mktemp("small") / "set", 24, seed=11)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, small_set, cache) -> Path:
    """A 2-step run from scratch, with its state, log and a checkpoint."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = train_cli(out, cache, "--data", str(small_set), "--init", "scratch", "--steps", "2", "--batch-size", "4", "--val-every", "2")
    assert result.returncode == 0, result.stderr
    return out


# --- 1. labels that name files outside their folder ------------------------------------------------


@pytest.fixture
def escaping_folder(tmp_path) -> Path:
    """A labelled folder with one good entry and three that reach outside it: a relative path
    up, an absolute path, and a symbolic link inside that points out."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(EXAMPLES[0], outside / "secret-503.png")
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(EXAMPLES[1], folder / "good.png")
    (folder / "link.png").symlink_to(outside / "secret-503.png")
    return folder


ESCAPES = ["../outside/secret-503.png", "/etc/hostname", "link.png"]


@pytest.mark.parametrize("form", ["json", "csv", "mat"])
def test_eval_refuses_label_entries_outside_the_data_folder(random_checkpoint, escaping_folder, tmp_path, form):
    entries = [{"file": "good.png", "label": "1012", "boxes": None}] + [{"file": f, "label": "503", "boxes": None} for f in ESCAPES]
    if form == "json":
        (escaping_folder / "labels.json").write_text(json.dumps(entries))
    elif form == "csv":
        with open(escaping_folder / "labels.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "number"])
            writer.writerows([[e["file"], e["label"]] for e in entries])
    else:
        write_digit_struct(escaping_folder / "digitStruct.mat", [(e["file"], [int(c) or 10 for c in e["label"]], [[1, 1, 10, 10]] * len(e["label"]))
                                                                 for e in entries])
    out = tmp_path / "report.json"
    result = run_cli("evaluation/eval_accuracy.py", "--checkpoint", str(random_checkpoint), "--data", str(escaping_folder), "--json", str(out))
    assert_no_traceback(result)
    assert result.returncode == 1, result.stderr  # records were left out
    report = json.loads(out.read_text())
    assert [p["file"] for p in report["images"]] == ["good.png"]
    assert report["left_out"]["outside the data folder"] == 3
    refused = [line for line in result.stderr.splitlines() if "refused" in line]
    assert len(refused) == 3 and all("labels." in line or "digitStruct" in line for line in refused), result.stderr


def test_training_refuses_label_entries_outside_the_data_folder(escaping_folder, tmp_path):
    (escaping_folder / "labels.json").write_text(json.dumps([{"file": f, "label": "503", "boxes": None} for f in ESCAPES]))
    result = train_cli(tmp_path / "out", tmp_path / "cache", "--data", str(escaping_folder), "--init", "scratch", "--steps", "1")
    assert_no_traceback(result)
    assert result.returncode == 2 and "no usable training or validation images" in result.stderr, result.stderr
    assert result.stderr.count("refused") == 3


# --- 2. a damaged training state ---------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "random-bytes", "missing-keys", "pickled-code"])
def test_a_damaged_training_state_is_one_line_and_changes_nothing(finished_run, cache, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    state = out / "training_state.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:5000])
    elif damage == "random-bytes":
        state.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "missing-keys":
        torch.save({"step": 2, "model": {}}, state)
    else:
        torch.save({"args": os.system}, state)
    before = listing(out)
    result = train_cli(out, cache, "--resume", "--steps", "4")
    line = one_error_line(result)
    assert result.returncode == 2 and "training_state.pt" in line, result.stderr
    assert listing(out) == before


# --- 3, 4, 9. one run per --out, a reused --out, leftovers -------------------------------------------


def test_a_second_run_into_a_locked_out_is_refused(finished_run, cache, small_set, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    with open(out / ".lock", "a") as held:  # what a run in progress holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = train_cli(out, cache, "--resume", "--steps", "4")
    line = one_error_line(result)
    assert result.returncode == 2 and "another training run" in line
    # the lock died with its holder: the same command now runs
    assert train_cli(out, cache, "--resume", "--steps", "4").returncode == 0


@pytest.mark.slow
def test_a_killed_run_leaves_no_stale_lock(cache, small_set, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--device", "cpu", "--out", str(out), "--cache", str(cache),
                             "--data", str(small_set), "--init", "scratch", "--steps", "100000", "--batch-size", "2", "--val-every", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "training_state.pt").exists() and time.time() < deadline:
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    result = train_cli(out, cache, "--resume", "--steps", "3")
    assert result.returncode == 0, result.stderr


def test_a_fresh_run_into_an_old_runs_out_is_refused_and_overwrite_clears_it(finished_run, cache, small_set, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = listing(out)
    result = train_cli(out, cache, "--data", str(small_set), "--init", "scratch", "--steps", "1", "--val-every", "1", "--batch-size", "4")
    line = one_error_line(result)
    assert result.returncode == 2 and "--resume" in line and "--overwrite" in line
    assert listing(out) == before
    result = train_cli(out, cache, "--data", str(small_set), "--init", "scratch", "--steps", "1", "--val-every", "1", "--batch-size", "4", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("model-*.pth")) == ["model-1.pth"]


def test_a_run_removes_the_leftovers_of_killed_writes(finished_run, cache, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    leftovers = [out / ".model-8.pth.k2j4h5g6.tmp", out / ".training_state.pt.a1b2c3d4.tmp"]
    for p in leftovers:
        p.write_bytes(b"half a checkpoint")
    keep = out / ".my-notes.tmp"  # not the project's temporary-name pattern: not ours to remove
    keep.write_text("mine")
    assert train_cli(out, cache, "--resume", "--steps", "3").returncode == 0
    assert not any(p.exists() for p in leftovers) and keep.exists()


def test_a_synthetic_set_killed_while_rendered_again_is_never_taken_for_the_old_one(tmp_path):
    """A cached set re-rendered with another seed and killed half way over its files: asked for
    the old set again, the cache renders it again rather than hand out the mix (the stamp goes
    first, and comes back last)."""
    folder, fresh = tmp_path / "set", tmp_path / "fresh"
    make_set(folder, 10, seed=1)
    child = subprocess.Popen([sys.executable, "-c", f"from svhn.synthetic import make_set; make_set({str(folder)!r}, 100000, seed=2)"], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (folder / "000030.png").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    assert (folder / "000030.png").exists()
    make_set(folder, 10, seed=1)
    make_set(fresh, 10, seed=1)
    assert (folder / "labels.json").read_text() == (fresh / "labels.json").read_text()
    assert all((folder / f"{i:06d}.png").read_bytes() == (fresh / f"{i:06d}.png").read_bytes() for i in range(10))


# --- 5, 6, 7. full and read-only disks -----------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_during_training_is_one_line_and_leaves_only_complete_files(random_checkpoint, cache, small_set, tmp_path):
    with tmpfs(tmp_path / "small", "200m") as out:  # a checkpoint (171 MB) fits, a state with its optimizer does not
        result = train_cli(out, cache, "--data", str(small_set), "--init", "scratch", "--steps", "2", "--batch-size", "4", "--val-every", "1")
        line = one_error_line(result)
        assert result.returncode == 1 and "cannot be written" in line, result.stderr
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
        for p in out.glob("*.pth"):
            torch.load(p, weights_only=True)  # every file under a final name is complete


def test_a_full_disk_during_export_leaves_nothing(random_checkpoint, tmp_path):
    with tmpfs(tmp_path / "small", "20m") as folder:
        result = run_cli("export.py", "--checkpoint", str(random_checkpoint), "--output", str(folder / "svhn.onnx"), "--samples", "0")
        line = one_error_line(result)
        assert result.returncode == 1 and "svhn.onnx" in line
        assert list(folder.iterdir()) == []


def test_a_read_only_crop_cache_is_one_line_naming_it(small_set, tmp_path):
    with tmpfs(tmp_path / "ro-cache", "1m", read_only=True) as cache:
        result = train_cli(tmp_path / "out", cache, "--data", str(small_set), "--init", "scratch", "--steps", "1")
        line = one_error_line(result)
        assert result.returncode == 2 and str(cache) in line and "--cache" in line


# --- 8. SIGTERM ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_a_resumable_state(cache, small_set, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--device", "cpu", "--out", str(out), "--cache", str(cache),
                             "--data", str(small_set), "--init", "scratch", "--steps", "100000", "--batch-size", "2", "--val-every", "1000"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "log.jsonl").exists() or "loss" not in (out / "log.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    step = torch.load(out / "training_state.pt", weights_only=True)["step"]
    assert step >= 10
    assert train_cli(out, cache, "--resume", "--steps", str(step + 1)).returncode == 0


# --- 10. a fine-tune that only unlearns ----------------------------------------------------------------


def test_a_fine_tune_must_beat_its_starting_weights(checkpoint, cache, tmp_path):
    """lr 0.5 wrecks the stand-in's weights at once: no step beats where it started, so no
    checkpoint is written and the run says the starting weights remain the best."""
    data = make_set(tmp_path / "plain", 40, seed=31)
    out = tmp_path / "run"
    result = train_cli(out, cache, "--data", str(data), "--init", str(checkpoint), "--steps", "2", "--val-every", "1", "--batch-size", "4",
                       "--lr", "0.5", "--val-fraction", "0.5")
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    start = log[0]["val_accuracy_before"]
    assert start > 0 and all(r["val_accuracy"] <= start for r in log if "val_accuracy" in r)
    assert list(out.glob("model-*.pth")) == []
    assert "starting weights remain the best" in result.stdout + result.stderr


# --- 11 - 18. rough edges --------------------------------------------------------------------------------


def test_inference_shows_progress_on_a_terminal_and_never_on_stdout(random_checkpoint):
    import pty
    import struct
    import termios

    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # a terminal's size: tqdm draws nothing in 0 columns
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--checkpoint", str(random_checkpoint)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=side, timeout=300)
    os.close(side)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    assert proc.returncode == 0
    assert b"9/9" in seen and b"img" in seen  # tqdm's bar on the terminal
    assert len(proc.stdout.decode().splitlines()) == 9 and b"img/s" not in proc.stdout


def test_inference_json_has_a_record_for_every_failed_input_in_order(random_checkpoint, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    inputs = [str(EXAMPLES[0]), str(tmp_path / "broken.png"), str(tmp_path / "missing.png"), str(EXAMPLES[1])]
    result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--json", "--batch-size", "3", "--image", *inputs)
    assert result.returncode == 1
    records = json.loads(result.stdout)
    assert [r["image"] for r in records] == inputs
    assert ["error" in r for r in records] == [False, True, True, False]
    assert "broken.png" in records[1]["error"] and "no such file" in records[2]["error"]


def test_eval_accuracy_exits_1_when_an_image_is_left_out(random_checkpoint, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(EXAMPLES[0], folder / "a.png")
    (folder / "b.png").write_bytes(b"broken")
    (folder / "labels.json").write_text(json.dumps([{"file": "a.png", "label": "3"}, {"file": "b.png", "label": "4"}]))
    result = run_cli("evaluation/eval_accuracy.py", "--checkpoint", str(random_checkpoint), "--data", str(folder))
    assert result.returncode == 1 and "image failed: 1" in result.stdout
    (folder / "labels.json").write_text(json.dumps([{"file": "a.png", "label": "3"}]))
    assert run_cli("evaluation/eval_accuracy.py", "--checkpoint", str(random_checkpoint), "--data", str(folder)).returncode == 0


def test_tiny_and_thin_images_get_a_note(random_checkpoint, tmp_path):
    Image.new("RGB", (1, 1), "white").save(tmp_path / "dot.png")
    Image.new("RGB", (2000, 10), "white").save(tmp_path / "strip.png")
    shutil.copy(EXAMPLES[0], tmp_path / "fine.png")
    result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--image", str(tmp_path))
    assert result.returncode == 0
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:") and "readable number" in line]
    assert len(notes) == 2 and any("dot.png" in n and "1x1" in n for n in notes) and any("strip.png" in n and "2000x10" in n for n in notes)


def test_workers_0_decodes_in_the_main_thread(random_checkpoint):
    result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--workers", "0")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 9, result.stderr


def test_written_checkpoints_follow_the_umask(finished_run):
    for p in [*finished_run.glob("model-*.pth"), finished_run / "training_state.pt", finished_run / "log.jsonl"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~_umask(), p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_contact_sheet_keeps_whole_file_names(random_checkpoint, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    long_name = "ahousenumberphotowithalongname0001.png"
    shutil.copy(EXAMPLES[0], folder / long_name)
    (folder / "labels.json").write_text(json.dumps([{"file": long_name, "label": "99999"}]))
    sheet = tmp_path / "sheet.png"
    result = run_cli("evaluation/eval_accuracy.py", "--checkpoint", str(random_checkpoint), "--data", str(folder), "--sheet", str(sheet))
    assert result.returncode == 0, result.stderr
    # one cell: 139 pixels of crop and numbers, then one 12-pixel line per 18 characters of the name
    assert Image.open(sheet).height == 139 + 12 * -(-len(long_name) // 18)


def test_an_empty_svhn_checkpoint_folder_says_where_the_path_came_from(tmp_path):
    result = run_cli("inference.py", env={"SVHN_CHECKPOINT": str(tmp_path)})
    line = one_error_line(result)
    assert result.returncode == 2 and "SVHN_CHECKPOINT" in line and "no model-<step>.pth" in line
