"""`prepare-data --local_test_frac`: each client's own held-out split (for --eval_personalized),
seeded, disjoint from its training data; off (the default) the folder is what it always was."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_helpers import dolly_records, write_array

from rblora.data import partition as P
from rblora.data.federated import (
    data_fingerprint,
    load_federated_split,
    load_local_test_records,
    open_client_images,
)
from rblora.data.prepare import main


def read(folder, name):
    return json.loads((folder / name).read_text(encoding="utf-8"))


@pytest.fixture
def dolly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_array(tmp_path / "dolly.json", dolly_records(30))  # 240 records
    return ["--source", "files", "--dolly", "dolly.json", "--partition", "iid"]


@pytest.mark.parametrize(
    ("size", "frac", "held"),
    [(1, 0.2, 0), (2, 0.2, 1), (3, 0.2, 1), (10, 0.2, 2), (10, 0.25, 2), (10, 0.95, 9), (9, 0, 0)],
)
def test_local_test_count_by_hand(size, frac, held):
    assert P.local_test_count(size, frac) == held


def test_carve_keeps_order_and_is_seeded():
    parts = [np.arange(10, 20), np.array([7]), np.arange(30, 35)]
    train, test = P.carve_local_tests(parts, 0.4, np.random.default_rng(3))
    assert [t.size for t in test] == [4, 0, 2] and [t.size for t in train] == [6, 1, 3]
    for p, a, b in zip(parts, train, test, strict=True):
        assert sorted([*a, *b]) == list(p) and list(a) == sorted(a) and list(b) == sorted(b)
    again = P.carve_local_tests(parts, 0.4, np.random.default_rng(3))
    assert all((x == y).all() for x, y in zip(test, again[1], strict=True))


def test_text_folder_with_local_tests(dolly, tmp_path):
    assert main(["3", *dolly, "--output_dir", "plain"]) == 0
    assert main(["3", *dolly, "--output_dir", "local", "--local_test_frac", "0.25"]) == 0
    plain, local = tmp_path / "plain" / "3", tmp_path / "local" / "3"
    meta = read(local, "partition.json")
    assert meta["local_test_frac"] == 0.25
    for k in range(3):
        whole = read(plain, f"local_training_{k}.json")
        train, test = read(local, f"local_training_{k}.json"), load_local_test_records(local, 3, k)
        assert len(test) == meta["local_test_sizes"][k] == round(0.25 * len(whole))
        assert meta["client_sizes"][k] == len(train) == len(whole) - len(test)
        # the same partition, split in two: the draws before the carving are unchanged
        key = lambda rs: sorted(json.dumps(r, sort_keys=True) for r in rs)  # noqa: E731
        assert key(train + test) == key(whole)
    assert read(local, "global_test.json") == read(plain, "global_test.json")
    assert sum(len(c) for c in load_federated_split(local, 3).clients) == sum(meta["client_sizes"])
    # the fingerprint covers the local tests through the digest in partition.json
    assert not any(n.startswith("local_test_") for n in data_fingerprint(local, 3))
    assert "local_test_frac" not in read(plain, "partition.json")["arguments"]


def test_option_off_writes_the_same_bytes(dolly, tmp_path):
    assert main(["3", *dolly, "--output_dir", "a"]) == 0
    assert main(["3", *dolly, "--output_dir", "b", "--local_test_frac", "0"]) == 0
    a, b = tmp_path / "a" / "3", tmp_path / "b" / "3"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.glob("*.json"):
        if p.name != "partition.json":
            assert p.read_bytes() == (b / p.name).read_bytes()
    ma, mb = read(a, "partition.json"), read(b, "partition.json")
    ma["arguments"].pop("output_dir"), mb["arguments"].pop("output_dir")
    assert ma == mb


def test_missing_local_tests_name_the_option(dolly, tmp_path):
    assert main(["3", *dolly]) == 0
    with pytest.raises(ValueError, match="--local_test_frac"):
        load_local_test_records(tmp_path / "data", 3, 0)


@pytest.mark.parametrize("bad", ["1", "-0.1", "1.5"])
def test_bad_fraction_one_line(dolly, capsys, bad):
    assert main(["3", *dolly, "--local_test_frac", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--local_test_frac {float(bad)!r}" in err


def test_image_local_tests(tmp_path, fake_assets):
    out = tmp_path / "img"
    argv = ["4", "--source", "digits", "--partition", "iid", "--test_per_category", "3"]
    assert main([*argv, "--output_dir", str(out), "--local_test_frac", "0.1"]) == 0
    folder = out / "4"
    meta = read(folder, "partition.json")
    images, reader = open_client_images(out, 4, [0, 1, 2, 3])
    seen = []
    for k in range(4):
        test = reader.local_test(k)
        assert len(test) == meta["local_test_sizes"][k] == 5  # 200 / 4 = 50 each
        index = read(folder, f"local_test_{k}.json")
        assert index["split"] == "train"
        seen += index["indices"] + read(folder, f"local_training_{k}.json")["indices"]
    assert sorted(seen) == list(range(200))
