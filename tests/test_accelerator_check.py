"""evaluation/accelerator_check.sh runs end to end (here on the CPU, with small settings) and
leaves every result as JSON under one folder, each step's exit status recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_accelerator_check_runs_and_writes_its_results(random_checkpoint, tmp_path):
    env = {**os.environ, "SVHN_CHECKPOINT": str(random_checkpoint), "PYTHON": sys.executable, "SVHN_CHECK_BATCHES": "1 2",
           "SVHN_CHECK_RUNS": "2", "SVHN_CHECK_COMPILE": "0", "SVHN_CHECK_TRAIN_IMAGES": "30", "SVHN_CHECK_TRAIN_STEPS": "2",
           "SVHN_CHECK_TRAIN_BATCHES": "2"}
    out = tmp_path / "results"
    result = subprocess.run(["bash", str(ROOT / "evaluation" / "accelerator_check.sh"), "cpu", str(out)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    steps = dict(line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines())
    assert steps and all(rc == "0" for rc in steps.values()), (out / "log.txt").read_text()
    assert {"test_load", "compare_fp32_default", "compare_float16", "precision_float32", "performance_eager", "train_short",
            "test_load_localizer", "compare_find_float32", "precision_localizer_bfloat16", "train_localizer_benchmark_b2"} <= set(steps)
    for name in ("compare-fp32-strict", "compare-bfloat16", "precision-float32", "precision-bfloat16", "performance-eager", "performance-bf16",
                 "compare-find-float32", "precision-localizer-float32"):
        data = json.loads((out / f"{name}.json").read_text())
        assert data.get("complete") is True, name
    assert json.loads((out / "environment.json").read_text())["device"] == "cpu"
    assert (out / "train-short-log.jsonl").read_text().count("\"val_accuracy\":") == 1
