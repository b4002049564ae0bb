"""Reading prepared folders back: round trip, and a clear ValueError for each broken folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import alpaca_records, dolly_records, write_array, write_jsonl

from rblora.data import (
    load_client_images,
    load_client_records,
    load_federated_images,
    load_federated_split,
    load_test_images,
    load_test_records,
    read_partition,
)
from rblora.data.prepare import main


@pytest.fixture
def prepared(tmp_path) -> Path:
    """``tmp_path/data/3`` prepared from small Dolly + Alpaca files (Dirichlet split)."""
    dolly = write_jsonl(tmp_path / "dolly.jsonl", dolly_records(20))
    alpaca = write_array(tmp_path / "alpaca.json", alpaca_records(100))
    argv = ["3", "0", "--dolly", str(dolly), "--alpaca", str(alpaca), "--min_size", "10"]
    assert main([*argv, "--output_dir", str(tmp_path / "data")]) == 0
    return tmp_path / "data"


def test_round_trip(prepared):
    data = load_federated_split(prepared, 3)
    folder = prepared / "3"
    for k in range(3):
        on_disk = json.loads((folder / f"local_training_{k}.json").read_text())
        assert data.clients[k] == on_disk
    assert data.global_test == json.loads((folder / "global_test.json").read_text())
    assert data.num_clients == 3 and data.client_sizes == data.meta["client_sizes"]
    assert load_federated_split(folder, 3).client_sizes == data.client_sizes  # the folder itself


def test_seed_made_folder_without_partition_json(prepared):
    (prepared / "3" / "partition.json").unlink()
    data = load_federated_split(prepared, 3)
    assert data.meta is None and data.num_clients == 3


def _only(src: Path, dst: Path, *names: str) -> Path:
    """``dst/3`` holding copies of ``src/3``'s files ``names`` and nothing else."""
    (dst / "3").mkdir(parents=True)
    for name in names:
        (dst / "3" / name).write_bytes((src / "3" / name).read_bytes())
    return dst


def test_a_node_reads_only_its_own_file_and_the_server_only_the_test_set(prepared, tmp_path):
    data = load_federated_split(prepared, 3)
    node = _only(prepared, tmp_path / "node1", "local_training_1.json")
    assert load_client_records(node, 3, 1) == data.clients[1]
    assert load_client_records(node / "3", 3, 1) == data.clients[1]  # the folder itself
    assert read_partition(node, 3) is None
    with pytest.raises(ValueError, match="local_training_0.json is missing"):
        load_client_records(node, 3, 0)
    server = _only(prepared, tmp_path / "server", "global_test.json", "partition.json")
    assert load_test_records(server, 3) == data.global_test
    assert read_partition(server, 3)["client_sizes"] == data.client_sizes
    # a node whose file disagrees with the partition.json beside it is refused, named
    both = _only(prepared, tmp_path / "both", "local_training_2.json", "partition.json")
    edit(both / "3" / "local_training_2.json", data.clients[2][:-1])
    with pytest.raises(ValueError, match=r"local_training_2.json holds \d+ examples but"):
        load_client_records(both, 3, 2)


def edit(path: Path, value) -> None:
    path.write_text(value if isinstance(value, str) else json.dumps(value), encoding="utf-8")


@pytest.mark.parametrize(
    ("breakage", "num_clients", "message"),
    [
        (lambda f: None, 4, "no prepared data for 4 clients"),
        (lambda f: (f / "local_training_1.json").unlink(), 3, "local_training_1.json is missing"),
        (lambda f: (f / "global_test.json").unlink(), 3, "global_test.json is missing"),
        (
            lambda f: edit(f / "local_training_3.json", []),
            3,
            "prepared for another client count",
        ),
        (
            lambda f: edit(f / "partition.json", {"num_clients": 5}),
            3,
            "describes 5 clients but 3 were asked for",
        ),
        (lambda f: edit(f / "local_training_2.json", '[\n{"a": 1},\n{oops}\n]'), 3, "json:3:"),
        (
            lambda f: edit(f / "local_training_0.json", [{"instruction": "x", "response": 3}]),
            3,
            "record 0: field 'response' must be a string",
        ),
        (lambda f: edit(f / "global_test.json", {"a": 1}), 3, "expected a JSON array"),
        (lambda f: edit(f / "local_training_0.json", []), 3, "no records"),
        (
            lambda f: edit(
                f / "local_training_0.json", [{"instruction": "x", "context": "", "response": "y"}]
            ),
            3,
            "the folder was modified",
        ),
        (
            lambda f: edit(f / "partition.json", {"num_clients": 3, "kind": "images"}),
            3,
            "holds images (partition.json kind 'images'), not the text records this task trains "
            "on; a run on this folder needs --task image",
        ),
    ],
)
def test_broken_folders(prepared, breakage, num_clients, message):
    breakage(prepared / "3")
    with pytest.raises(ValueError) as err:
        load_federated_split(prepared, num_clients)
    assert message in str(err.value)


def _only_files(src: Path, dst: Path, *names: str) -> Path:
    dst.mkdir(parents=True)
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_text_folder_read_as_images_names_the_task_option(prepared):
    with pytest.raises(ValueError, match="holds text records .* needs --task lm$"):
        load_federated_images(prepared, 3)


def test_images_round_trip(tmp_path, fake_assets):
    out = tmp_path / "data"
    assert (
        main(["2", "--source", "fashion-mnist", "--partition", "iid", "--output_dir", str(out)])
        == 0
    )
    data = load_federated_images(out, 2)
    assert [c.images.shape[0] for c in data.clients] == [100, 100]
    first = data.clients[0]
    assert tuple(first.images.shape[1:]) == (4, 4) and str(first.images.dtype) == "torch.uint8"
    # fake images carry their label in pixel [0, 0]
    assert first.images[:, 0, 0].long().tolist() == first.labels.tolist()
    assert data.global_test.labels.tolist().count(0) == 10  # 50 test images, 5 classes, all taken
    client = load_client_images(out, 2, 1)
    assert client.labels.tolist() == data.clients[1].labels.tolist()
    assert load_test_images(out, 2).images.shape[0] == 50
    # a node's folder holds its index file only: source and classes come from the image set
    node = _only_files(out / "2", tmp_path / "node" / "2", "local_training_1.json")
    alone = load_client_images(node.parent, 2, 1)
    assert alone.labels.tolist() == client.labels.tolist() and alone.classes == client.classes
    assert alone.images.equal(client.images)
    server = _only_files(out / "2", tmp_path / "server" / "2", "global_test.json", "partition.json")
    assert load_test_images(server.parent, 2).labels.equal(data.global_test.labels)
    with pytest.raises(ValueError, match="client 2 is out of range: valid are 0..1"):
        load_client_images(out, 2, 2)
    with pytest.raises(ValueError, match="holds images .* needs --task image"):
        load_federated_split(out, 2)
    edit(
        out / "2" / "local_training_0.json",
        {"source": "fashion-mnist", "split": "train", "indices": [0, 999]},
    )
    with pytest.raises(ValueError, match=r"indices must lie in 0..199"):
        load_federated_images(out, 2)
