"""Many clients: 200 of the packaged digits here; 10,000 of Fashion-MNIST in under a minute
(slow: it fetches the Debian package on first use)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rblora.data import federated as F
from rblora.data import load_federated_images, open_client_images, read_partition
from rblora.data.federated import data_fingerprint
from rblora.data.prepare import main

REPO = Path(__file__).resolve().parents[2]


def _count_client_reads(monkeypatch) -> list[str]:
    """The client files read from now on (``_read_index`` of ``local_training_<k>.json``)."""
    read, original = [], F._read_index

    def spy(path):
        if F.CLIENT_FILE.match(Path(path).name):
            read.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(F, "_read_index", spy)
    return read


def _check_folder(folder: Path, clients: int, pool: int, min_size: int) -> dict:
    meta = json.loads((folder / "partition.json").read_text())
    sizes = meta["client_sizes"]
    assert len(sizes) == clients and sum(sizes) == pool and min(sizes) == min_size
    assert meta["min_size"] == min_size and isinstance(meta["client_files_sha256"], str)
    files = sorted(folder.glob("local_training_*.json"))
    assert len(files) == clients
    index = [json.loads(p.read_text())["indices"] for p in files]
    joined = np.concatenate([np.asarray(i) for i in index])
    assert np.array_equal(np.sort(joined), np.arange(pool))  # disjoint, covering the pool
    assert sorted(len(i) for i in index) == sorted(sizes)
    return meta


@pytest.fixture(scope="module")
def digits200(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits200")
    argv = ["200", "--source", "digits", "--partition", "dirichlet", "--alpha", "0.5"]
    assert main([*argv, "--test_per_category", "5", "--output_dir", str(out)]) == 0
    return out


def test_200_clients_get_a_documented_minimum_and_a_top_up(digits200, capsys):
    meta = _check_folder(digits200 / "200", 200, 1437, 3)  # 40 x 200 > 1437: floor(1437 / 400)
    assert any(n.startswith("min_size 3: 200 clients of 40 do not fit") for n in meta["notes"])
    top_up = [n for n in meta["notes"] if n.startswith("Dirichlet: none of 1000 draws")]
    assert len(top_up) == 1 and "topped up" in top_up[0]
    assert (digits200 / "200" / "partition.png").stat().st_size > 10_000


def test_a_run_opens_many_clients_without_reading_their_files(digits200, monkeypatch):
    read = _count_client_reads(monkeypatch)
    clients, reader = open_client_images(digits200, 200, list(range(200)))
    assert read == [] and len(clients) == 200
    assert sum(clients.sizes.values()) == 1437 and clients.classes[3] == "3"
    assert read_partition(digits200, 200, "images")["num_clients"] == 200
    assert sorted(data_fingerprint(digits200, 200)) == [
        "global_test.json", "global_training.json", "partition.json",
    ]  # fmt: skip
    assert read == []
    split = clients[7]  # read when asked, and checked against partition.json
    assert read == ["local_training_7.json"] and len(split) == clients.sizes[7]
    whole = load_federated_images(digits200, 200)
    assert np.array_equal(split.images.numpy(), whole.clients[7].images.numpy())
    # a node (some clients) reads and checks its own files at once
    read.clear()
    node, _ = open_client_images(digits200, 200, [5])
    assert read == ["local_training_5.json"] and list(node) == [5]
    with pytest.raises(ValueError, match="client 200 is out of range"):
        open_client_images(digits200, 200, [200])


def test_a_damaged_client_file_shows_when_it_is_read(digits200, tmp_path):
    import shutil

    folder = tmp_path / "200"
    shutil.copytree(digits200 / "200", folder)
    path = folder / "local_training_3.json"
    index = json.loads(path.read_text())
    index["indices"] = index["indices"][:-1]
    path.write_text(json.dumps(index))
    clients, _ = open_client_images(tmp_path, 200, list(range(200)))
    with pytest.raises(ValueError, match="local_training_3.json holds .* but partition.json says"):
        clients[3]
    (folder / "local_training_9.json").unlink()
    with pytest.raises(ValueError, match="local_training_9.json is missing"):
        open_client_images(tmp_path, 200, list(range(200)))


@pytest.mark.slow
def test_10000_fashion_mnist_clients_in_under_a_minute(tmp_path):
    from rblora.assets import fetch

    fetch("fashion-mnist", progress=False)  # a first fetch is not the preparation's time
    cmd = [sys.executable, str(REPO / "prepare_data.py"), "10000", "--source", "fashion-mnist"]
    cmd += ["--partition", "dirichlet", "--alpha", "0.5", "--output_dir", str(tmp_path)]
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stderr[-2000:]
    assert seconds < 60, f"10,000 clients took {seconds:.1f} s"
    meta = _check_folder(tmp_path / "10000", 10_000, 60_000, 3)
    assert "9980 more clients" in run.stdout and len(run.stdout.splitlines()) < 60
    assert any("topped up" in n for n in meta["notes"])
    hist = np.asarray(meta["client_histograms"])
    assert hist.shape == (10_000, 10) and (hist.sum(0) == 6000).all()
