"""Image sources: a user's image folder, the pool subsample, resizing."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from rblora.data import load_federated_images
from rblora.data.federated import ImageSplit
from rblora.data.prepare import main


def _image_folder(root, per_class=(12, 9, 15)):
    rng = np.random.default_rng(0)
    for c, n in enumerate(per_class):
        folder = root / f"class_{'abc'[c]}"
        (folder / "nested").mkdir(parents=True)
        for i in range(n):
            size = (20 + i, 16 + c)  # sizes differ: every image is resized on load
            pixels = rng.integers(0, 255, size=(*size[::-1], 3), dtype=np.uint8)
            target = folder / ("nested" if i % 3 == 0 else "") / f"img{i}.png"
            Image.fromarray(pixels).save(target)
        (folder / "notes.txt").write_text("not an image")
    return root


def test_image_folder_round_trip(tmp_path):
    root = _image_folder(tmp_path / "images")
    argv = ["2", "--source", "imagefolder", "--image_dir", str(root), "--partition", "iid"]
    assert main([*argv, "--test_per_category", "2", "--output_dir", str(tmp_path / "data")]) == 0
    data = load_federated_images(tmp_path / "data", 2)
    assert data.global_test.classes == ["class_a", "class_b", "class_c"]
    assert len(data.global_test) == 6 and sum(len(c) for c in data.clients) == 36 - 6
    listing = json.loads((tmp_path / "data" / "2" / "image_files.json").read_text())
    assert len(listing["files"]) == 36 and all(f.endswith(".png") for f in listing["files"])
    seen = [str(p) for c in data.clients for p in c.images] + [
        str(p) for p in data.global_test.images
    ]
    assert len(set(seen)) == 36  # disjoint and complete
    pixels = data.clients[0].pixels(14)
    assert pixels.shape == (len(data.clients[0]), 3, 14, 14) and pixels.dtype == torch.uint8


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--source", "imagefolder"], "--image_dir ROOT go together"),
        (["--source", "imagefolder", "--image_dir", "/nonexistent/x"], "is not a folder"),
    ],
)
def test_image_folder_bad_input(tmp_path, argv, fragment, capsys):
    assert main(["2", *argv, "--output_dir", str(tmp_path / "data")]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "data" / "2").exists()


def test_pool_size_keeps_a_stratified_subsample(tmp_path):
    argv = ["4", "--source", "digits", "--partition", "iid", "--pool_size", "200"]
    assert main([*argv, "--test_per_category", "5", "--output_dir", str(tmp_path)]) == 0
    data = load_federated_images(tmp_path, 4)
    labels = torch.cat([c.labels for c in data.clients])
    assert len(labels) == 200 and len(data.global_test) == 50
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() >= 18 and counts.max() <= 22  # digits is balanced: ~20 per class


def test_resize_keeps_content_and_shape():
    img = torch.zeros(1, 8, 8, dtype=torch.uint8)
    img[0, :, 4:] = 200  # right half bright
    out = ImageSplit(img, torch.zeros(1, dtype=torch.long), ["x"]).pixels(16)
    assert out.shape == (1, 1, 16, 16)
    assert out[0, 0, :, :6].float().mean() < 20 and out[0, 0, :, 10:].float().mean() > 180


def _bad_image(path, kind):
    """A file an image folder may hold by mistake: ``kind`` is truncated-jpeg, truncated-png,
    text (a text file named .png) or empty."""
    if kind == "text":
        path.write_text("not an image")
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        pixels = np.random.default_rng(1).integers(0, 255, size=(40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format=kind.split("-")[1].upper())
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])  # the header opens; the pixels end early
    return path


@pytest.mark.parametrize(
    "kind, name",
    [("truncated-jpeg", "cut.jpg"), ("truncated-png", "cut.png"), ("text", "t.png"),
     ("empty", "e.jpeg")],
)  # fmt: skip
def test_image_folder_refuses_an_image_that_does_not_decode(tmp_path, capsys, kind, name):
    from PIL import ImageFile

    root = _image_folder(tmp_path / "images")
    bad = _bad_image(root / "class_b" / "nested" / name, kind)
    argv = ["2", "--source", "imagefolder", "--image_dir", str(root), "--partition", "iid"]
    assert main([*argv, "--output_dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "--skip_bad_images" in err[0], err
    assert not (tmp_path / "data" / "2").exists()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # decoded strictly, global state untouched


def test_skip_bad_images_leaves_them_out_with_a_note(tmp_path, capsys):
    root = _image_folder(tmp_path / "images")
    bad = [
        _bad_image(root / "class_a" / "cut.jpg", "truncated-jpeg"),
        _bad_image(root / "class_c" / "nested" / "t.png", "text"),
    ]
    argv = ["2", "--source", "imagefolder", "--image_dir", str(root), "--partition", "iid"]
    argv += ["--test_per_category", "2", "--output_dir", str(tmp_path / "data")]
    assert main([*argv, "--skip_bad_images"]) == 0
    out = capsys.readouterr().out
    for path in bad:
        assert f"note: skipped {path.relative_to(root).as_posix()}" in out
    listing = json.loads((tmp_path / "data" / "2" / "image_files.json").read_text())
    assert len(listing["files"]) == 36 and "class_a/cut.jpg" not in listing["files"]
    meta = json.loads((tmp_path / "data" / "2" / "partition.json").read_text())
    assert sum("skipped" in note for note in meta["notes"]) == 2
    data = load_federated_images(tmp_path / "data", 2)
    assert sum(len(c) for c in data.clients) + len(data.global_test) == 36


def test_skip_bad_images_is_for_image_folders_only(tmp_path, capsys):
    argv = ["2", "--source", "digits", "--skip_bad_images", "--output_dir", str(tmp_path)]
    assert main(argv) == 2
    assert "--skip_bad_images" in capsys.readouterr().err


def test_an_image_damaged_after_preparation_is_named_when_read(tmp_path):
    root = _image_folder(tmp_path / "images")
    argv = ["2", "--source", "imagefolder", "--image_dir", str(root), "--partition", "iid"]
    assert main([*argv, "--test_per_category", "2", "--output_dir", str(tmp_path / "data")]) == 0
    data = load_federated_images(tmp_path / "data", 2)
    victim = data.clients[0].images[0]
    _bad_image(victim, "truncated-png")
    with pytest.raises(ValueError, match=f"{re.escape(str(victim))}: cannot decode"):
        data.clients[0].pixels(14)
