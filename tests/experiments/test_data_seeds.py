"""--data_seeds: one folder per partition seed, prepared with the comparison's options."""

from __future__ import annotations

import json

import pytest

from rblora.experiments.data_seeds import data_folders


def test_data_folders_prepare_take_and_refuse(workspace, tmp_path):
    said = []
    given = workspace / "data"  # prepared with seed 1
    folders = data_folders(given, 3, [1, 2], tmp_path, said.append)
    assert folders == {1: given, 2: tmp_path / "data" / "seed2"}
    made = json.loads((tmp_path / "data" / "seed2" / "3" / "partition.json").read_text())
    ref = json.loads((given / "3" / "partition.json").read_text())
    assert made["seed"] == 2 and made["sources"] == ref["sources"]
    assert made["client_sizes"] == ref["client_sizes"] == [8, 12, 16]
    train = [json.loads((f / "3" / "local_training_0.json").read_text()) for f in folders.values()]
    assert train[0] != train[1]  # another partition
    assert said == [f"data seed 2: preparing {tmp_path / 'data' / 'seed2' / '3'} with the "
                    f"options of {given / '3'}"]  # fmt: skip

    said.clear()
    assert data_folders(given, 3, [2], tmp_path, said.append) == {2: folders[2]}
    assert "prepared earlier, same options" in said[0]

    path = tmp_path / "data" / "seed2" / "3" / "partition.json"
    for key, value in (("seed", 5), ("partition", "iid")):
        changed = dict(made, arguments=dict(made["arguments"]))
        if key == "seed":
            changed["seed"] = value
        else:
            changed["arguments"][key] = value
        path.write_text(json.dumps(changed))
        with pytest.raises(ValueError, match=rf"seed2/3 was prepared with other options.*{key}"):
            data_folders(given, 3, [2], tmp_path, said.append)
    path.write_text(json.dumps(dict(made, sources={"dolly": "0" * 64})))
    with pytest.raises(ValueError, match=r"source files \(checksums\) differ"):
        data_folders(given, 3, [2], tmp_path, said.append)


def test_a_data_folder_without_its_options_is_refused(tmp_path):
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "global_test.json").write_text("[]")
    with pytest.raises(ValueError, match=r"partition.json is missing"):
        data_folders(tmp_path, 3, [1], tmp_path / "out", print)
