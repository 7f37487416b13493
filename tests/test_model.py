"""The rebuilt network computes the published function, loads the published format, and its
inference forms (BatchNorm folded, oneDNN-packed) compute the same function."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, run_cli
from model import HEAD_CLASSES, NUM_PARAMETERS, SVHNModel, decode, flops_per_image
from svhn.checkpoints import CheckpointError, checkpoint_in_dir, find_checkpoint, load_model, load_state_dict
from svhn import onednn
from svhn.recognizer import InferenceNet, Recognizer, fold_batchnorm

POOL_STRIDES = [2, 1, 2, 1, 2, 1, 2, 1]


def has_onednn_ops() -> bool:
    try:
        onednn.ops()
        return True
    except RuntimeError:
        return False


def functional_forward(sd: dict, x: torch.Tensor, three_pools: bool = False) -> list[torch.Tensor]:
    """The published network written out in torch.nn.functional calls, independently of model.py.

    three_pools=True is the plausible wrong rebuild: max-pools only in blocks 1, 3 and 5, then
    AdaptiveAvgPool2d(7). It has the same parameters and loads the same state dict.
    """
    for i in range(8):
        p = f"_hidden{i + 1}"
        x = F.conv2d(x, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"], padding=2)
        x = F.batch_norm(
            x, sd[f"{p}.1.running_mean"], sd[f"{p}.1.running_var"], sd[f"{p}.1.weight"], sd[f"{p}.1.bias"],
            training=False, eps=1e-5,
        )
        x = F.relu(x)
        if three_pools:
            if i in (0, 2, 4):
                x = F.max_pool2d(x, kernel_size=2, stride=2)
        else:
            x = F.max_pool2d(x, kernel_size=2, stride=POOL_STRIDES[i], padding=1)
    if three_pools:
        x = F.adaptive_avg_pool2d(x, 7)
    assert x.shape[1:] == (192, 7, 7)
    x = x.reshape(x.shape[0], 192 * 7 * 7)
    x = F.relu(F.linear(x, sd["_hidden9.0.weight"], sd["_hidden9.0.bias"]))
    x = F.relu(F.linear(x, sd["_hidden10.0.weight"], sd["_hidden10.0.bias"]))
    heads = ["_digit_length"] + [f"_digit{i}" for i in range(1, 6)]
    return [F.linear(x, sd[f"{h}.0.weight"], sd[f"{h}.0.bias"]) for h in heads]


@pytest.fixture(scope="module")
def model() -> SVHNModel:
    return random_model(seed=1)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.rand(4, 3, 54, 54) * 2 - 1


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def relative_diff(a, b) -> float:
    """Largest deviation of a from b, relative to b's largest magnitude."""
    return max_diff(a, b) / max(float(y.abs().max()) for y in b)


def test_matches_an_independent_functional_forward(model, batch):
    sd = model.state_dict()
    with torch.inference_mode():
        ours = model(batch)
        expected = functional_forward(sd, batch)
        wrong = functional_forward(sd, batch, three_pools=True)
    assert [tuple(t.shape) for t in ours] == [(4, c) for c in HEAD_CLASSES]
    assert max_diff(ours, expected) < 1e-5
    assert relative_diff(ours, expected) < 1e-4
    # the three-pool variant loads the same weights but is another function
    assert relative_diff(wrong, expected) > 0.05


def test_published_size_and_key_names(model):
    assert sum(p.numel() for p in model.parameters()) == 42_868_734  # the published count
    keys = list(model.state_dict())
    assert keys[:7] == [
        "_hidden1.0.weight", "_hidden1.0.bias", "_hidden1.1.weight", "_hidden1.1.bias",
        "_hidden1.1.running_mean", "_hidden1.1.running_var", "_hidden1.1.num_batches_tracked",
    ]
    assert keys[-2:] == ["_digit5.0.weight", "_digit5.0.bias"]
    assert "_hidden10.0.weight" in keys and "_digit_length.0.bias" in keys
    assert round(flops_per_image() / 1e9, 3) == 1.587


def test_dropout_and_batchnorm_are_inference_mode_after_loading(random_checkpoint, batch):
    loaded = load_model(random_checkpoint)
    assert not loaded.training
    with torch.inference_mode():
        assert max_diff(loaded(batch), loaded(batch)) == 0


def test_stand_in_checkpoint_loads_strictly(checkpoint):
    sd = load_state_dict(checkpoint)
    SVHNModel().load_state_dict(sd, strict=True)
    assert sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k) == NUM_PARAMETERS


def test_folder_means_its_highest_step(tmp_path):
    for step in (900, 12000, 5000):
        (tmp_path / f"model-{step}.pth").write_bytes(b"")
    (tmp_path / "model-final.pth").write_bytes(b"")
    assert checkpoint_in_dir(tmp_path).name == "model-12000.pth"


def test_prefixed_state_dicts_load(tmp_path, model, batch):
    sd = model.state_dict()
    torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, tmp_path / "model-1.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "wrapped.pth")
    with torch.inference_mode():
        expected = model(batch)
        assert max_diff(load_model(tmp_path / "model-1.pth")(batch), expected) == 0
        assert max_diff(load_model(tmp_path / "wrapped.pth")(batch), expected) == 0


class _Pickled:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def bad_checkpoints(tmp_path, model) -> dict:
    """file name -> (how it was made, words the error must contain)."""
    sd = model.state_dict()
    good = tmp_path / "good.pth"
    torch.save(sd, good)
    cases = {}
    (tmp_path / "text.pth").write_text("not a checkpoint")
    cases["text.pth"] = "not a PyTorch checkpoint"
    (tmp_path / "empty.pth").write_bytes(b"")
    cases["empty.pth"] = "empty file"
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    cases["truncated.pth"] = "truncated or corrupt"
    torch.save({"x": _Pickled()}, tmp_path / "code.pth")
    cases["code.pth"] = "pickled Python code"
    torch.save(model, tmp_path / "module.pth")
    cases["module.pth"] = "pickled Python code"
    torch.save({k: v for k, v in sd.items() if not k.startswith("_digit5")}, tmp_path / "missing.pth")
    cases["missing.pth"] = "missing keys (_digit5.0.weight, _digit5.0.bias)"
    wrong = dict(sd)
    wrong["_hidden9.0.weight"] = torch.zeros(3072, 4608)
    torch.save(wrong, tmp_path / "shape.pth")
    cases["shape.pth"] = "_hidden9.0.weight has shape (3072, 4608), expected (3072, 9408)"
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    cases["extra.pth"] = "unexpected keys (extra.weight)"
    torch.save([1, 2, 3], tmp_path / "list.pth")
    cases["list.pth"] = "not a state dict"
    return cases


def test_bad_checkpoints_get_one_readable_error(tmp_path, model, capfd):
    for name, words in bad_checkpoints(tmp_path, model).items():
        with pytest.raises(CheckpointError) as info:
            load_model(tmp_path / name)
        message = str(info.value)
        assert str(tmp_path / name) in message and words in message, (name, message)
        assert "\n" not in message
    assert "should-never-run" not in capfd.readouterr().out


def test_bad_checkpoint_through_test_load_and_inference(tmp_path, model):
    cases = bad_checkpoints(tmp_path, model)
    for name in ("code.pth", "truncated.pth", "shape.pth"):
        result = run_cli("test_load.py", "--checkpoint", str(tmp_path / name))
        assert result.returncode == 1, result.stdout + result.stderr
        assert cases[name] in result.stdout and "Traceback" not in result.stdout + result.stderr
        result = run_cli("inference.py", "--checkpoint", str(tmp_path / name))
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and cases[name] in lines[0], result.stderr


def test_test_load_reports_on_the_stand_in(checkpoint):
    result = run_cli("test_load.py", "--checkpoint", str(checkpoint))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "42,868,734 parameters (published: 42,868,734)" in result.stdout
    assert "4/4 checks passed" in result.stdout


def test_checkpoint_search_order(tmp_path, monkeypatch, random_checkpoint):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SVHN_CHECKPOINT", raising=False)
    with pytest.raises(CheckpointError) as info:
        find_checkpoint(download=False)
    assert "modelscope download --model Genius-Society/svhn" in str(info.value)
    cached = tmp_path / "cache" / "models" / "Genius-Society" / "svhn"
    cached.mkdir(parents=True)
    (cached / "model-3.pth").write_bytes(b"x")
    assert find_checkpoint(download=False) == cached / "model-3.pth"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model-2.pth").write_bytes(b"x")
    assert find_checkpoint(download=False) == tmp_path / "checkpoints" / "model-2.pth"
    monkeypatch.setenv("SVHN_CHECKPOINT", str(random_checkpoint))
    assert find_checkpoint(download=False) == random_checkpoint / "model-7.pth"
    assert find_checkpoint(str(cached / "model-3.pth")) == cached / "model-3.pth"
    with pytest.raises(CheckpointError, match="no such file or folder"):
        find_checkpoint(str(tmp_path / "nowhere"))


def test_no_weights_anywhere_names_the_download_command(tmp_path):
    env = {"SVHN_CHECKPOINT": "", "SVHN_OFFLINE": "1", "MODELSCOPE_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    result = run_cli("inference.py", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "modelscope download --model Genius-Society/svhn" in result.stderr
    assert "--checkpoint" in result.stderr and "Traceback" not in result.stderr


# --- the inference forms --------------------------------------------------------------------


def test_fold_batchnorm_is_exact_up_to_fp32_rounding(model, batch):
    block = model._hidden3
    folded = fold_batchnorm(block[0], block[1])
    x = torch.randn(2, 64, 29, 29)
    with torch.inference_mode():
        expected = block[1](block[0](x))
        got = folded(x)
    assert float((got - expected).abs().max()) < 1e-4 * float(expected.abs().max())
    with torch.inference_mode():
        assert max_diff(InferenceNet(model)(batch), model(batch)) < 1e-4


def test_folding_changes_nothing_that_the_unfolded_model_reads(model, batch):
    before = copy.deepcopy(model.state_dict())
    InferenceNet(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.skipif(not has_onednn_ops(), reason="this torch has no oneDNN")
def test_packed_cpu_path_equals_the_published_module(model, batch):
    fast = Recognizer(model)
    assert fast.settings["kernels"] == "onednn-packed"
    with torch.inference_mode():
        expected = model(batch)
    for n in (1, 4):
        assert max_diff(fast.outputs(batch[:n]), [t[:n] for t in expected]) < 1e-4


def _raises(*args, **kwargs):
    raise RuntimeError("mkldnn::_convolution_pointwise() expected at most 9 argument(s) but received 10 argument(s)")


_CONV_POINTWISE = torch.ops.mkldnn._convolution_pointwise if has_onednn_ops() else None


def _channels_swapped(*args, **kwargs):
    # what a changed weight layout looks like from outside: the right sizes, the wrong channels
    return _CONV_POINTWISE(*args, **kwargs).flip(1)


@pytest.mark.skipif(not has_onednn_ops(), reason="this torch has no oneDNN")
@pytest.mark.parametrize(
    "break_it, why",
    [
        (lambda mp: mp.delattr(torch._C._nn, "mkldnn_linear"), "has no oneDNN op mkldnn_linear"),
        (lambda mp: mp.setattr(torch.ops.mkldnn, "_convolution_pointwise", _raises), "RuntimeError: mkldnn::_convolution_pointwise() expected"),
        (lambda mp: mp.setattr(torch.ops.mkldnn, "_convolution_pointwise", _channels_swapped), "its output disagrees with the plain network"),
    ],
    ids=["missing-op", "changed-op", "wrong-numbers"],
)
def test_packed_cpu_path_falls_back_when_its_private_ops_fail(model, batch, monkeypatch, break_it, why):
    """torch's private oneDNN ops missing, with another schema, or computing something else:
    the recognizer notices while it is built, says why, and runs the channels_last eager path."""
    break_it(monkeypatch)
    notes = []
    fast = Recognizer(model, note=notes.append)
    assert fast.settings["kernels"] == "eager" and fast.settings["memory_format"] == "channels_last"
    assert len(notes) == 1 and why in notes[0] and "oneDNN-packed CPU path not used" in notes[0]
    with torch.inference_mode():
        assert max_diff(fast.outputs(batch), model(batch)) < 1e-4


@pytest.mark.parametrize("options", [{"fold": False}, {"channels_last": False}, {"channels_last": True, "fold": True}])
def test_every_cpu_form_computes_the_same(model, batch, options):
    with torch.inference_mode():
        expected = model(batch)
    assert max_diff(Recognizer(model, **options).outputs(batch), expected) < 1e-4


# --- reading the output ------------------------------------------------------------------------


def logits_for(length: int, digits: list[int], p: float = 0.9) -> list[torch.Tensor]:
    """Logits whose softmax puts probability p on the given class of each head."""
    out = []
    for classes, pick in zip(HEAD_CLASSES, [length] + digits):
        t = torch.full((1, classes), 0.0)
        t[0, pick] = torch.log(torch.tensor(p * (classes - 1) / (1 - p)))
        out.append(t)
    return out


def test_decode_number_length_and_confidence():
    r = decode(logits_for(3, [4, 0, 7, 10, 10], p=0.9))[0]
    assert (r.number, r.length, r.digits) == ("407", 3, [4, 0, 7, 10, 10])
    assert r.confidence == pytest.approx(0.9**4, rel=1e-5)  # p(length) and the three digits used
    assert not r.blank_dropped and not r.length_over_5


def test_decode_drops_blanks_and_marks_them():
    r = decode(logits_for(3, [1, 10, 2, 5, 10]))[0]
    assert r.number == "12" and r.blank_dropped


def test_decode_length_zero_reads_empty():
    r = decode(logits_for(0, [1, 2, 3, 4, 5], p=0.8))[0]
    assert r.number == "" and r.confidence == pytest.approx(0.8, rel=1e-5)


def test_decode_length_six_uses_five_digits():
    r = decode(logits_for(6, [1, 2, 3, 4, 5], p=0.5))[0]
    assert r.number == "12345" and r.length_over_5 and r.confidence == pytest.approx(0.5**6, rel=1e-5)
