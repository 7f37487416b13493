"""The device layer against the real torch_npu wheels from PyPI (no CANN here, as on an Ascend
host whose set_env.sh was not sourced): every entry point still runs on the CPU, --device npu
says why not in one line, --device auto falls back with a note. Plus fp32 modes, graph-mode
fallback and the CANN version.

The wheels are installed once per test session with `pip install --no-deps --target DIR` and put
on PYTHONPATH, which is how Python (and torch's plug-in loader, through importlib.metadata) sees
an installed package; DIR is kept under .cache/ for the next session, not committed.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_no_traceback, run_cli
from svhn import devices

TORCH_RELEASE = devices.release(torch.__version__)
MISMATCHED = "2.6.0"  # a real torch_npu release for another torch
CACHE = ROOT / ".cache" / "torch_npu"


def install_torch_npu(version: str) -> Path:
    """A folder holding the real torch_npu wheel `version` (and its pyyaml), for PYTHONPATH."""
    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip(f"torch_npu has no wheels for {platform.machine()}")
    target = CACHE / f"{version}-py{sys.version_info.major}{sys.version_info.minor}"
    if (target / "torch_npu" / "__init__.py").is_file():
        return target
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--target", str(target),
         f"torch-npu=={version}", "pyyaml"],
        capture_output=True, text=True, timeout=900,
    )
    if result.returncode != 0:
        pytest.skip(f"torch-npu=={version} could not be installed here (no package index?): {result.stderr.strip()[-300:]}")
    return target


@pytest.fixture(scope="session")
def paired_torch_npu() -> dict:
    """The environment of a host with the torch_npu release that pairs with this torch, no CANN."""
    return {"PYTHONPATH": str(install_torch_npu(TORCH_RELEASE)), "TORCH_DEVICE_BACKEND_AUTOLOAD": ""}


@pytest.fixture(scope="session")
def mismatched_torch_npu() -> dict:
    """torch_npu 2.6.0 installed with --no-deps beside this torch."""
    return {"PYTHONPATH": str(install_torch_npu(MISMATCHED)), "TORCH_DEVICE_BACKEND_AUTOLOAD": ""}


def without(env: dict, *names: str) -> dict:
    return {k: v for k, v in {**os.environ, **env}.items() if k not in names}


def run_with(env: dict, script: str, *args: str) -> subprocess.CompletedProcess:
    full = without(env, "TORCH_DEVICE_BACKEND_AUTOLOAD")  # as a user's shell has it: unset
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # installs the real torch_npu wheels once per session
def test_the_real_wheel_breaks_import_torch_by_itself(paired_torch_npu):
    """What this layer guards against, shown on the real wheel: its torch.backends entry point
    makes a bare `import torch` fail when CANN is missing."""
    result = subprocess.run([sys.executable, "-c", "import torch"], env=without(paired_torch_npu, "TORCH_DEVICE_BACKEND_AUTOLOAD"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Failed to load the backend extension: torch_npu" in result.stderr


@pytest.mark.parametrize(
    "script, args",
    [
        ("inference.py", ["--device", "cpu", "--image", "examples/plaque-6.png"]),
        ("test_load.py", ["--device", "cpu"]),
        ("evaluation/eval_precision.py", ["--device", "cpu", "--samples", "2"]),
        ("evaluation/eval_performance.py", ["--devices", "cpu", "--batch-sizes", "1", "--warmup", "0", "--runs", "2"]),
    ],
)
@pytest.mark.slow  # installs the real torch_npu wheels once per session
def test_cpu_runs_as_if_torch_npu_were_absent(paired_torch_npu, random_checkpoint, script, args):
    result = run_with(paired_torch_npu, script, "--checkpoint", str(random_checkpoint), *args)
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert "torch_npu" not in result.stderr


@pytest.mark.slow  # installs the real torch_npu wheels once per session
def test_eval_accuracy_runs_beside_torch_npu(paired_torch_npu, random_checkpoint, samples):
    result = run_with(paired_torch_npu, "evaluation/eval_accuracy.py", "--checkpoint", str(random_checkpoint), "--device", "cpu",
                      "--data", str(samples), "--limit", "2")
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow  # installs the real torch_npu wheels once per session
def test_npu_without_cann_is_one_line(paired_torch_npu, random_checkpoint):
    result = run_with(paired_torch_npu, "inference.py", "--checkpoint", str(random_checkpoint), "--device", "npu")
    assert_no_traceback(result)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: CANN is not set up (libascendcl.so cannot be loaded)")
    assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in lines[0]


@pytest.mark.slow  # installs the real torch_npu wheels once per session
def test_auto_falls_back_to_the_cpu_with_a_note(paired_torch_npu, random_checkpoint):
    result = run_with(paired_torch_npu, "inference.py", "--checkpoint", str(random_checkpoint), "--device", "auto", "--image", "examples/plaque-6.png")
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert "note: no NPU used: CANN is not set up (libascendcl.so cannot be loaded)" in result.stderr
    assert f"device {'cuda' if torch.cuda.is_available() else 'cpu'}" in result.stderr


@pytest.mark.slow  # installs the real torch_npu wheels once per session
def test_a_mismatched_pair_names_the_torch_to_install(mismatched_torch_npu, random_checkpoint):
    result = run_with(mismatched_torch_npu, "inference.py", "--checkpoint", str(random_checkpoint), "--device", "npu")
    assert_no_traceback(result)
    assert result.returncode == 2
    assert f"error: torch_npu {MISMATCHED} pairs with torch {MISMATCHED}, but torch {torch.__version__} is installed" in result.stderr
    assert f"torch=={MISMATCHED}+cpu from PyTorch's CPU wheel index" in result.stderr


@pytest.mark.slow  # installs the real torch_npu wheels once per session
def test_a_users_own_autoload_setting_is_kept(paired_torch_npu, random_checkpoint):
    """TORCH_DEVICE_BACKEND_AUTOLOAD=1 is the user's choice: torch then loads torch_npu, which
    fails without CANN, and the script says so in one line instead of torch's traceback."""
    env = {**without(paired_torch_npu), "TORCH_DEVICE_BACKEND_AUTOLOAD": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--checkpoint", str(random_checkpoint), "--device", "cpu"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert_no_traceback(result)
    assert result.returncode == 2
    assert result.stderr.startswith("error: import torch failed, a device plug-in did not load (ImportError: libhccl.so")
    assert "unset TORCH_DEVICE_BACKEND_AUTOLOAD" in result.stderr


@pytest.mark.slow  # installs the real torch_npu wheels once per session
def test_the_test_suite_itself_runs_beside_torch_npu(paired_torch_npu):
    """pytest imports the project through conftest.py, which imports svhn first."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_model.py", "-k", "decode"],
        cwd=ROOT, env=without(paired_torch_npu, "TORCH_DEVICE_BACKEND_AUTOLOAD"), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "passed" in result.stdout


def test_device_strings():
    assert devices.resolve("cpu") == torch.device("cpu")
    assert devices.resolve(" CPU ") == torch.device("cpu")
    for bad in ("gpu", "npu:x", "cuda:-1", "cpu:1", ""):
        with pytest.raises(devices.DeviceError):
            devices.resolve(bad)


# --- fp32 modes -----------------------------------------------------------------------------


@pytest.fixture
def restore_cuda_flags():
    """The switches are process-wide: put back what the test changed."""
    saved = {obj: obj.fp32_precision for obj in (torch.backends.cuda.matmul, torch.backends.cudnn.conv)} if hasattr(
        torch.backends.cuda.matmul, "fp32_precision") else {}
    yield
    for obj, value in saved.items():
        obj.fp32_precision = value


def test_fp32_modes_switch_tf32_on_cuda_without_warnings(restore_cuda_flags):
    """The CUDA switches, exercised on a CPU-only torch (they are torch.backends settings): strict
    and fast set them, default leaves them, and no deprecation warning is printed."""
    switches = devices.cuda_fp32_switches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert devices.apply_fp32_mode(switches, "strict") == {"conv": "ieee", "matmul": "ieee"}
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            assert torch.backends.cuda.matmul.fp32_precision == "ieee" and torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert devices.apply_fp32_mode(switches, "fast") == {"conv": "tf32", "matmul": "tf32"}
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert devices.apply_fp32_mode(switches, "default") == {"conv": "tf32", "matmul": "tf32"}
    with pytest.raises(devices.DeviceError, match="unknown fp32 mode 'tf32'"):
        devices.apply_fp32_mode(switches, "tf32")


def test_no_tf32_is_reported_where_the_device_has_none():
    """A pre-Ampere GPU (and the CPU) has no switches: every mode reports IEEE."""
    for mode in devices.FP32_MODES:
        assert devices.apply_fp32_mode({}, mode) == {"conv": "ieee", "matmul": "ieee"}
    assert devices.fp32_switches(torch.device("cpu")) == {}


# --- graph mode -----------------------------------------------------------------------------


def test_compile_falls_back_to_eager_when_the_backend_fails_at_the_first_call(random_checkpoint):
    result = run_cli("inference.py", "--checkpoint", str(random_checkpoint), "--device", "cpu", "--compile",
                     env={"CXX": "/nonexistent/g++"})
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert "note: graph mode failed on cpu (" in result.stderr and "running eager" in result.stderr
    assert "graph eager" in result.stderr
    assert len(result.stdout.strip().splitlines()) == 9  # every example read


def test_compile_on_the_cpu_keeps_its_options_to_itself(random_checkpoint):
    """Compiling on the CPU works, and its freezing option is not left in inductor's global config."""
    code = (
        "import svhn, torch, torch._inductor.config as c\n"
        "from svhn.checkpoints import load_model\n"
        "from svhn.recognizer import Recognizer\n"
        "notes = []\n"
        f"r = Recognizer(load_model({str(random_checkpoint)!r}), 'cpu', compile=True, note=notes.append)\n"
        "print(r.settings['graph_mode'], c.freezing, notes)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["torch.compile(freezing)", "False"], result.stdout


# --- CANN version ---------------------------------------------------------------------------


def test_cann_version_is_the_release_from_the_toolkit_layout(tmp_path):
    """As CANN lays it out: <Ascend>/ascend-toolkit/latest -> 8.0.0, with the install info under
    <arch>-linux/ and component versions (which are not the release) beside it."""
    toolkit = tmp_path / "Ascend" / "ascend-toolkit"
    release = toolkit / "8.0.0"
    (release / "x86_64-linux").mkdir(parents=True)
    (release / "x86_64-linux" / "ascend_toolkit_install.info").write_text(
        "package_name=Ascend-cann-toolkit\nversion=8.0.0\ninnerversion=V100R001C20SPC001B251\narch=x86_64\nos=linux\n"
    )
    (release / "compiler").mkdir()
    (release / "compiler" / "version.info").write_text("Version=7.6.0.1.220\n")
    (toolkit / "latest").symlink_to(release)
    assert devices.cann_version([toolkit / "latest"]) == "8.0.0"
    assert devices.cann_version([tmp_path / "nowhere"]) is None
