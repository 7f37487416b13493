"""The device layer: every way torch_npu can fail to load is explained in words a user can act
on (tested with stand-in torch_npu packages, since no NPU or CANN is here), auto falls back,
and the fp32 mode switches are reported."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import device as dev
from conftest import assert_no_traceback, run_cli

TORCH_RELEASE = dev._release(torch.__version__)


def fake_torch_npu(root: Path, version: str, body: str) -> dict:
    """A package named torch_npu whose import runs `body`, with installed-package metadata."""
    pkg = root / "torch_npu"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)
    info = root / f"torch_npu-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch_npu\nVersion: {version}\n")
    return {"PYTHONPATH": str(root)}


def fake_cann(root: Path) -> dict:
    """Empty libascendcl.so and libhccl.so on LD_LIBRARY_PATH: CANN 'sourced' as far as dlopen sees."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build stand-in CANN libraries")
    lib = root / "lib"
    lib.mkdir()
    for name in ("libascendcl.so", "libhccl.so"):
        subprocess.run(["cc", "-shared", "-o", str(lib / name), "-x", "c", "/dev/null"], check=True)
    return {"LD_LIBRARY_PATH": str(lib)}


def npu_run(env: dict, device: str = "npu", checkpoint: Path | None = None) -> subprocess.CompletedProcess:
    args = ["--device", device] + (["--checkpoint", str(checkpoint)] if checkpoint else [])
    result = run_cli("inference.py", *args, env=env)
    assert_no_traceback(result)
    return result


def test_npu_without_torch_npu(random_checkpoint, tmp_path):
    result = npu_run({"PYTHONPATH": str(tmp_path)}, checkpoint=random_checkpoint)
    assert result.returncode == 2
    assert "error: torch_npu is not installed: pip install torch-npu" in result.stderr


def test_npu_with_a_torch_npu_for_another_torch(random_checkpoint, tmp_path):
    env = fake_torch_npu(tmp_path, "2.1.0.post8", "raise RuntimeError('must not be imported')\n")
    result = npu_run(env, checkpoint=random_checkpoint)
    assert result.returncode == 2
    assert f"torch_npu 2.1.0.post8 pairs with torch 2.1.0, but torch {torch.__version__} is installed" in result.stderr


def test_npu_without_cann(random_checkpoint, tmp_path):
    env = fake_torch_npu(tmp_path, TORCH_RELEASE, "raise RuntimeError('must not be imported')\n")
    result = npu_run({**env, "LD_LIBRARY_PATH": str(tmp_path)}, checkpoint=random_checkpoint)
    assert result.returncode == 2
    assert "CANN is not set up (libascendcl.so cannot be loaded)" in result.stderr
    assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in result.stderr


def test_torch_npu_that_exits_during_import(random_checkpoint, tmp_path):
    # what torch_npu itself does when libhccl.so is missing: print a traceback, then sys.exit()
    body = "import sys, traceback\ntraceback.print_stack()\nsys.exit()\n"
    env = {**fake_torch_npu(tmp_path, TORCH_RELEASE, body), **fake_cann(tmp_path)}
    result = npu_run(env, checkpoint=random_checkpoint)
    assert result.returncode == 2
    assert "torch_npu could not start, CANN is not set up" in result.stderr
    assert "File " not in result.stderr  # its traceback was not let through


def test_torch_npu_built_for_another_torch(random_checkpoint, tmp_path):
    body = "raise ImportError('/x/torch_npu/_C.so: undefined symbol: _ZN3c104impl8GPUTrace')\n"
    env = {**fake_torch_npu(tmp_path, TORCH_RELEASE, body), **fake_cann(tmp_path)}
    result = npu_run(env, checkpoint=random_checkpoint)
    assert result.returncode == 2
    assert f"torch_npu was built for another torch than {torch.__version__}" in result.stderr


def test_auto_falls_back_and_says_why(random_checkpoint, tmp_path):
    env = fake_torch_npu(tmp_path, "2.1.0", "raise RuntimeError('must not be imported')\n")
    result = npu_run(env, device="auto", checkpoint=random_checkpoint)
    assert result.returncode == 0, result.stderr
    assert "note: no NPU used: torch_npu 2.1.0 pairs with torch 2.1.0" in result.stderr
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"device {expected}" in result.stderr


def test_device_strings():
    assert dev.resolve("cpu") == torch.device("cpu")
    assert dev.resolve(" CPU ") == torch.device("cpu")
    for bad in ("gpu", "npu:x", "cuda:-1", "cpu:1", ""):
        with pytest.raises(dev.DeviceError):
            dev.resolve(bad)


def test_fp32_mode_on_cpu_is_ieee():
    cpu = torch.device("cpu")
    for mode in dev.FP32_MODES:
        assert dev.set_fp32_mode(cpu, mode) == {"conv": "ieee", "matmul": "ieee"}
    with pytest.raises(dev.DeviceError):
        dev.set_fp32_mode(cpu, "tf32")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_fp32_mode_on_cuda_switches_tf32():
    cuda = dev.resolve("cuda")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        assert dev.set_fp32_mode(cuda, "strict") == {"conv": "ieee", "matmul": "ieee"}
        assert dev.set_fp32_mode(cuda, "fast") == {"conv": "tf32", "matmul": "tf32"}
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_environment_names_the_machine():
    env = dev.environment(torch.device("cpu"))
    assert env["torch"] == torch.__version__ and env["cpu_cores"] >= 1 and env["device_name"]
