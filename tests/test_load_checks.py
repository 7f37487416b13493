"""test_load.py: every check it makes can fail, each on the checkpoint that should fail it."""

from __future__ import annotations

import torch

from conftest import assert_no_traceback, random_model, run_cli


def save(tmp_path, name: str, state_dict: dict):
    path = tmp_path / name
    torch.save(state_dict, path)
    return path


def check_lines(result) -> dict[str, str]:
    """check name -> 'ok' / 'FAIL', from test_load's report."""
    out = {}
    for line in result.stdout.splitlines():
        if line.startswith("[ok] ") or line.startswith("[FAIL] "):
            status, rest = line.split("] ", 1)
            out[rest.split(":")[0]] = status.strip("[")
    return out


KEYS = "keys, shapes and dtypes are the published network's"
FORWARD = "forward pass on the CPU"


def test_every_check_passes_on_good_weights(random_checkpoint):
    result = run_cli("test_load.py", "--checkpoint", str(random_checkpoint))
    assert result.returncode == 0, result.stdout + result.stderr
    checks = check_lines(result)
    assert list(checks.values()) == ["ok"] * 4 and "4/4 checks passed" in result.stdout


def test_junk_fails_the_load_check(tmp_path):
    path = tmp_path / "model-1.pth"
    path.write_text("hello")
    result = run_cli("test_load.py", "--checkpoint", str(path))
    assert_no_traceback(result)
    assert result.returncode == 1 and check_lines(result)["loads with weights_only=True"] == "FAIL"


def test_integer_weights_fail_the_keys_check(tmp_path):
    sd = {k: (v.round().to(torch.int32) if v.is_floating_point() else v) for k, v in random_model().state_dict().items()}
    result = run_cli("test_load.py", "--checkpoint", str(save(tmp_path, "model-1.pth", sd)))
    assert_no_traceback(result)
    assert result.returncode == 1 and check_lines(result)[KEYS] == "FAIL"
    assert "is int32, expected floating point" in result.stdout
    # and no other script reads with them either
    result = run_cli("inference.py", "--checkpoint", str(tmp_path / "model-1.pth"))
    assert result.returncode == 2 and "expected floating point" in result.stderr


def test_weights_that_overflow_fail_the_forward_check(tmp_path):
    sd = random_model().state_dict()
    sd["_hidden9.0.weight"] = sd["_hidden9.0.weight"] * 1e30
    sd["_hidden10.0.weight"] = sd["_hidden10.0.weight"] * 1e30
    result = run_cli("test_load.py", "--checkpoint", str(save(tmp_path, "model-1.pth", sd)))
    assert_no_traceback(result)
    checks = check_lines(result)
    assert result.returncode == 1 and checks[FORWARD] == "FAIL", result.stdout
    assert "NaN or Inf in the logits" in result.stdout


def test_the_device_check_reads_the_devices_own_output(tmp_path):
    """Logits near 1e5 are fine in fp32 and overflow float16 (largest 65504): the forward check
    on the CPU passes, the float16 device check sees the device's own Inf and fails."""
    sd = random_model().state_dict()
    for i in ["_digit_length"] + [f"_digit{j}" for j in range(1, 6)]:
        sd[f"{i}.0.bias"] = torch.full_like(sd[f"{i}.0.bias"], 1e5)
    path = save(tmp_path, "model-1.pth", sd)
    result = run_cli("test_load.py", "--checkpoint", str(path), "--dtype", "float16")
    assert_no_traceback(result)
    checks = check_lines(result)
    assert checks[FORWARD] == "ok", result.stdout
    assert checks["cpu float16 output matches the CPU fp32 reference"] == "FAIL", result.stdout
    assert "NaN/Inf in the output" in result.stdout and result.returncode == 1
    assert check_lines(run_cli("test_load.py", "--checkpoint", str(path)))["cpu float32 output matches the CPU fp32 reference"] == "ok"


def test_a_missing_checkpoint_is_a_usage_error(tmp_path):
    result = run_cli("test_load.py", "--checkpoint", str(tmp_path / "none.pth"))
    assert_no_traceback(result)
    assert result.returncode == 2 and "no such file or folder" in result.stderr
