"""Shared fixtures: the stand-in checkpoint and sample photos (from the environment, as .ci/run
sets them), a checkpoint of random weights made here, and a runner for the real CLI."""

from __future__ import annotations

import svhn  # noqa: F401  (first, as in every script: keeps torch_npu from loading itself at `import torch`)

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import SVHNModel

ROOT = Path(__file__).resolve().parents[1]


def _env_path(name: str, what: str) -> Path:
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"{name} is not set: no {what} here (CI points it at ../shared)")
    path = Path(value)
    if not path.exists():
        pytest.skip(f"{name}={value} does not exist")
    return path


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    """The stand-in for the published checkpoint (a folder or a model-<step>.pth)."""
    return _env_path("SVHN_CHECKPOINT", "checkpoint in the published format")


@pytest.fixture(scope="session")
def samples() -> Path:
    """Real photos with their true numbers and digit boxes (labels.json)."""
    return _env_path("SVHN_SAMPLES", "labelled sample photos")


@pytest.fixture(scope="session")
def sample_labels(samples: Path) -> list[dict]:
    return json.loads((samples / "labels.json").read_text())


def random_model(seed: int = 0) -> SVHNModel:
    """The network with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = SVHNModel()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(1000)
    return model.eval()


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """A folder with one model-<step>.pth of random weights, in the published format."""
    folder = tmp_path_factory.mktemp("random-checkpoint")
    torch.save(random_model().state_dict(), folder / "model-7.pth")
    return folder


def run_cli(
    script: str, *args: str, env: dict | None = None, cwd: Path = ROOT, prefix: tuple = (), timeout: float = 600, **kwargs
) -> subprocess.CompletedProcess:
    """Run one of the project's scripts (a path relative to the repository) in a fresh Python,
    as a user would; `prefix` is a command that wraps it (setpriv, say)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*prefix, sys.executable, str(ROOT / script), *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, **kwargs,
    )


def ctrl_c_default() -> None:
    """preexec_fn for a child a test will interrupt: Ctrl-C's default disposition, whatever the
    test runner inherited (a shell starts background jobs with SIGINT ignored, and a Python
    started so never turns SIGINT into KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def assert_no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


def without_root_privilege() -> tuple:
    """A command prefix under which permission bits hold: root reads every folder, so as root the
    CLI runs without the capabilities that bypass them (setpriv, from util-linux)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permission bits cannot be made to hold")
    drop = "-dac_override,-dac_read_search"
    return (setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}", "--")
