"""Preprocessing equals the published (torchvision) pipeline to the bit, every image mode a user
has is handled, and the SVHN evaluation crop is the published one."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from svhn.images import (
    ImageError,
    digit_crop,
    digit_crop_box,
    expand_inputs,
    open_image,
    preprocess,
    resize_and_crop,
    to_tensor,
)


def published_pipeline(img: Image.Image) -> torch.Tensor:
    """torchvision's Resize([64, 64]), CenterCrop([54, 54]), ToTensor(), Normalize([0.5]*3, [0.5]*3)
    written out with NumPy: bilinear PIL resize, crop at int(round((64 - 54) / 2)) = 5, float32
    division by 255, then (x - 0.5) / 0.5 in float32."""
    small = np.asarray(img.convert("RGB").resize((64, 64), Image.BILINEAR), dtype=np.uint8)
    crop = small[5:59, 5:59].astype(np.float32) / np.float32(255)
    crop = (crop - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))


def generated_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(10, 10), (54, 54), (64, 64), (17, 300), (700, 1000), (333, 65)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def test_preprocessing_equals_the_published_pipeline_on_generated_images():
    for img in generated_images():
        expected = published_pipeline(img)
        assert torch.equal(preprocess(img), expected), img.size
        assert torch.equal(to_tensor(np.stack([resize_and_crop(img)]))[0], expected)


def test_preprocessing_equals_the_published_pipeline_on_the_samples(samples):
    files = sorted(samples.glob("*.png"))
    assert len(files) >= 10
    for path in files:
        expected = published_pipeline(Image.open(path))
        assert torch.equal(preprocess(path), expected), path.name
        assert torch.equal(preprocess(path.read_bytes()), expected), path.name


def test_preprocessing_equals_torchvision_to_the_bit(samples):
    """tests/torchvision_reference.json holds the SHA-256 of the float32 tensor that torchvision's
    Resize([64, 64]), CenterCrop([54, 54]), ToTensor(), Normalize([0.5]*3, [0.5]*3) made of each
    sample, bundled example and generated image (torchvision 0.29.1, torch 2.14.1, Pillow 13.0.0;
    torchvision does not install beside this CPU torch, so the numbers travel instead)."""
    reference = json.loads((Path(__file__).parent / "torchvision_reference.json").read_text())
    ours = {}
    for folder in (samples, ROOT / "examples"):
        for path in sorted(folder.glob("*.png")):
            ours[f"{folder.name}/{path.name}"] = digest(preprocess(path))
    for img in generated_images():
        ours[f"generated/{img.height}x{img.width}"] = digest(preprocess(img))
    assert len(ours) == len(reference["images"]) >= 25
    differ = [name for name, sha in reference["images"].items() if ours.get(name) != sha]
    assert differ == [], differ


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().astype("<f4").tobytes()).hexdigest()


def test_batches_equal_single_images():
    imgs = generated_images()
    batch = to_tensor([resize_and_crop(i) for i in imgs])
    assert batch.shape == (len(imgs), 3, 54, 54) and batch.dtype == torch.float32
    for i, img in enumerate(imgs):
        assert torch.equal(batch[i], preprocess(img))


# --- image modes ------------------------------------------------------------------------------


def encoded(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (40, 30), dtype=np.uint8)


def test_every_mode_becomes_rgb(grey):
    rgb = np.stack([grey, 255 - grey, grey // 2], axis=2)
    cases = {
        "L": Image.fromarray(grey, "L"),
        "LA": Image.fromarray(np.stack([grey, grey], axis=2), "LA"),
        "RGBA": Image.fromarray(np.dstack([rgb, grey]), "RGBA"),
        "P": Image.fromarray(rgb).convert("P"),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "1": Image.fromarray(grey).convert("1"),
    }
    for mode, img in cases.items():
        for source in (img, encoded(img, "TIFF" if mode == "CMYK" else "PNG")):
            out = open_image(source)
            assert out.mode == "RGB" and out.size == (30, 40), mode
            assert preprocess(source).shape == (3, 54, 54)
    # grey and grey+alpha read as the grey values on all three channels (alpha dropped, as convert('RGB'))
    expected = np.stack([grey] * 3, axis=2)
    assert np.array_equal(np.asarray(open_image(encoded(cases["L"]))), expected)
    assert np.array_equal(np.asarray(open_image(encoded(cases["LA"]))), expected)


def test_sixteen_bit_images_are_scaled_not_clipped(grey):
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)
    data = encoded(sixteen)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    got = np.asarray(open_image(data))
    assert np.array_equal(got, np.stack([grey] * 3, axis=2))


def test_exif_orientation_is_applied():
    upright = np.zeros((20, 40, 3), dtype=np.uint8)
    upright[:, :20] = 255  # white left half
    img = Image.fromarray(upright)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; display rotated 90 degrees clockwise
    data = encoded(img, exif=exif)
    out = open_image(data)
    assert out.size == (20, 40)
    assert np.array_equal(np.asarray(out), np.asarray(img.transpose(Image.Transpose.ROTATE_270)))
    assert np.asarray(out)[:20].min() == 255 and np.asarray(out)[20:].max() == 0  # white on top


def test_bad_images_say_what_is_wrong(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = {
        "text.png": "not an image",
        "empty.png": "empty file",
        "cut.png": "truncated or corrupt",
        "missing.png": "no such file",
    }
    for name, words in cases.items():
        with pytest.raises(ImageError) as info:
            open_image(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)) and words in str(info.value)
    with pytest.raises(ImageError, match="empty file"):
        open_image(b"")


def test_inputs_from_files_folders_and_globs(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "empty").mkdir()
    paths, errors = expand_inputs([str(tmp_path), str(tmp_path / "*.png"), str(tmp_path / "notes.txt"),
                                   str(tmp_path / "z*.png"), str(tmp_path / "empty")])
    assert [p.name for p in paths] == ["a.jpg", "b.png", "b.png", "notes.txt"]
    assert errors == [f"{tmp_path / 'z*.png'}: no file matches this pattern", f"{tmp_path / 'empty'}: no images in this folder"]


# --- the evaluation crop ----------------------------------------------------------------------


def test_digit_crop_box_by_hand(sample_labels):
    # svhn-train-2.png, digits 2 and 3: boxes [77, 29, 23, 32] and [98, 25, 26, 32].
    # union: left 77, top 25, right max(100, 124) = 124, bottom max(61, 57) = 61 -> 47 x 36
    # square side 47 around (100.5, 43): left 77.0, top 19.5
    # crop left round(77 - 7.05) = 70, top round(19.5 - 7.05) = round(12.45) = 12, side round(61.1) = 61
    boxes = next(s["boxes"] for s in sample_labels if s["file"] == "svhn-train-2.png")
    assert digit_crop_box(boxes) == (70, 12, 131, 73)


def test_digit_crop_box_truncates_and_rounds_half_to_even():
    # boxes truncated to ints: [3.9, 2.2, 10.7, 10.1] -> [3, 2, 10, 10]; side 10 centred at (8, 7)
    # square left 3, top 2; crop left round(3 - 1.5) = round(1.5) = 2, top round(0.5) = 0; side 13
    assert digit_crop_box([[3.9, 2.2, 10.7, 10.1]]) == (2, 0, 15, 13)


def test_digit_crop_pads_with_black_outside_the_image():
    img = Image.new("RGB", (20, 20), (255, 255, 255))
    crop = digit_crop(img, [[0, 0, 20, 20]])  # grown by 30 %: 3 px of border outside on each side
    assert crop.shape == (54, 54, 3)
    big = np.asarray(img.crop(digit_crop_box([[0, 0, 20, 20]])))
    assert big[0, 0].max() == 0 and big[13, 13].min() == 255
    assert crop.min() < 255  # the black border survives resizing into the crop
