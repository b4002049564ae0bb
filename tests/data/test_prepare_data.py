"""`prepare-data` end to end: the seed's command line on small files, every output file, atomic
writes, and every bad input (exit code 2, one message, nothing written)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from data_helpers import DOLLY_CATEGORIES, alpaca_records, dolly_records, write_array, write_jsonl

from rblora.data import load_federated_split
from rblora.data import prepare as prep
from rblora.data.prepare import main
from rblora.utils.atomic import exclusive_dir

REPO = Path(__file__).resolve().parents[2]
TEXT_KEYS = {"instruction", "context", "response", "category"}


def read(folder: Path, name: str):
    return json.loads((folder / name).read_text(encoding="utf-8"))


def check_text_folder(folder: Path, k: int) -> tuple[list[list[dict]], list[dict], dict]:
    """Every file of the layout is there and consistent; returns clients, test, meta."""
    names = {p.name for p in folder.iterdir()}
    expected = {f"local_training_{i}.json" for i in range(k)}
    expected |= {"global_training.json", "global_test.json", "partition.json", "partition.png"}
    assert names == expected
    assert (folder / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    clients = [read(folder, f"local_training_{i}.json") for i in range(k)]
    test, meta = read(folder, "global_test.json"), read(folder, "partition.json")
    union = [r for c in clients for r in c]
    assert read(folder, "global_training.json") == union
    as_key = [json.dumps(r, sort_keys=True) for r in union]
    assert len(set(as_key)) == len(as_key), "a record went to two clients"
    assert not set(as_key) & {json.dumps(r, sort_keys=True) for r in test}
    assert meta["num_clients"] == k and meta["client_sizes"] == [len(c) for c in clients]
    for c, row in zip(clients, meta["client_histograms"], strict=True):
        counts = Counter(r["category"] for r in c)
        assert row == [counts.get(name, 0) for name in meta["categories"]]
    return clients, test, meta


@pytest.fixture
def seed_files(tmp_path, monkeypatch):
    """The seed's file names in the working directory (Dolly as the seed's JSON array)."""
    monkeypatch.chdir(tmp_path)
    write_array(tmp_path / "new-databricks-dolly-15k.json", dolly_records(30))  # 240 records
    write_array(tmp_path / "alpaca_data.json", alpaca_records(200))
    return tmp_path


def test_seed_command_line_sizes_default(seed_files, capsys):
    assert main(["10"]) == 0
    out = capsys.readouterr().out
    clients, test, meta = check_text_folder(seed_files / "data" / "10", 10)
    # pool = 240 + 200 - (8 x 10 + 80) = 280 < 14,800: the seed's sizes scaled by 280 / 14,800
    assert meta["client_sizes"] == [int(s * 280 / 14800) for s in prep.P.SEED_CLIENT_SIZES]
    assert "scaled by 0.0189" in out and "Data saved to:" in out
    counts = Counter(r["category"] for r in test)
    assert counts == {**dict.fromkeys(DOLLY_CATEGORIES, 10), "alpaca": 80}  # the seed's split
    assert all(set(r) == TEXT_KEYS for c in clients for r in c)
    assert meta["partition"] == "sizes" and meta["seed"] == 42 and meta["source"] == "files"
    digest = hashlib.sha256((seed_files / "alpaca_data.json").read_bytes()).hexdigest()
    assert meta["sources"]["alpaca"]["sha256"] == digest
    assert meta["sources"]["dolly"]["path"].endswith("new-databricks-dolly-15k.json")


def test_prepare_data_script_dirichlet_jsonl(tmp_path):
    write_jsonl(tmp_path / "databricks-dolly-15k.jsonl", dolly_records(30))
    write_array(tmp_path / "alpaca_data.json", alpaca_records(200))
    run = subprocess.run(
        [sys.executable, str(REPO / "prepare_data.py"), "4", "0", "7", "--min_size", "20"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    clients, test, meta = check_text_folder(tmp_path / "data" / "4", 4)
    assert meta["partition"] == "dirichlet" and meta["seed"] == 7
    assert sum(meta["client_sizes"]) == 280 and min(meta["client_sizes"]) >= 20  # whole pool
    assert meta["arguments"]["alpha"] == 0.5
    assert "H bits" in run.stdout  # the summary table


def test_shards_mode_and_determinism(seed_files):
    args = ["5", "1", "--dolly", "new-databricks-dolly-15k.json", "--alpaca", "alpaca_data.json"]
    assert main([*args, "--output_dir", "a"]) == 0
    assert main([*args, "--output_dir", "b"]) == 0
    assert main([*args[:2], "3", *args[2:], "--output_dir", "c"]) == 0
    a, b, c = (seed_files / d / "5" for d in "abc")
    for name in ("local_training_0.json", "local_training_4.json", "global_test.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    meta_a, meta_b = read(a, "partition.json"), read(b, "partition.json")
    assert meta_a["arguments"].pop("output_dir") != meta_b["arguments"].pop("output_dir")
    assert meta_a == meta_b
    assert (a / "local_training_0.json").read_bytes() != (c / "local_training_0.json").read_bytes()
    clients, _, meta = check_text_folder(a, 5)
    assert meta["partition"] == "shards"
    assert sum(meta["client_sizes"]) == 280
    # 280 category-sorted examples in 10 shards of 28: each client spans at most 4 categories
    assert max(sum(v > 0 for v in row) for row in meta["client_histograms"]) <= 4


def test_flags_iid_client_sizes_and_test_per_category(seed_files):
    argv = ["3", "--partition", "iid", "--test_per_category", "5", "--seed", "1"]
    assert main(argv) == 0
    _, test, meta = check_text_folder(seed_files / "data" / "3", 3)
    assert len(test) == 9 * 5 and sorted(meta["client_sizes"]) == [131, 132, 132]  # 395 / 3
    assert main(["3", "2", "--client_sizes", "10,20,30", "--output_dir", "s"]) == 0
    assert read(seed_files / "s" / "3", "partition.json")["client_sizes"] == [10, 20, 30]


def test_embedded_mixture_default_with_fake_assets(tmp_path, monkeypatch, fake_assets):
    monkeypatch.chdir(tmp_path)  # no Dolly/Alpaca here: the embedded mixture is the default
    assert main(["3", "0", "--min_size", "5", "--test_per_category", "4"]) == 0
    clients, test, meta = check_text_folder(tmp_path / "data" / "3", 3)
    assert meta["source"] == "mixture" and meta["categories"] == ["alpha", "beta", "gamma"]
    assert sum(meta["client_sizes"]) == 60 + 40 + 46  # gamma: 50 minus 4 held out
    assert Counter(r["task"] for r in test) == {"alpha": 4, "beta": 4, "gamma": 4}
    assert all(r["context"].startswith("Question: ") for r in test)
    assert all(
        r["response"] == "The answer is: " + "AB"[r["answer"]] + ". " + r["choices"][r["answer"]]
        for r in test
    )


def test_image_source_writes_indices(tmp_path, fake_assets):
    out = tmp_path / "img"
    assert (
        main(
            [
                "4",
                "--source",
                "digits",
                "--partition",
                "dirichlet",
                "--min_size",
                "10",
                "--test_per_category",
                "3",
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    folder = out / "4"
    meta = read(folder, "partition.json")
    assert meta["kind"] == "images" and meta["categories"] == [f"class{c}" for c in range(5)]
    parts = [read(folder, f"local_training_{k}.json") for k in range(4)]
    assert all(p["source"] == "digits" and p["split"] == "train" for p in parts)
    joined = sorted(i for p in parts for i in p["indices"])
    assert joined == list(range(200))
    test = read(folder, "global_test.json")
    assert test["split"] == "test" and len(test["indices"]) == 15
    assert read(folder, "global_training.json")["indices"] == [
        i for p in parts for i in p["indices"]
    ]


def test_existing_folder_refused_then_overwritten(seed_files, capsys):
    assert main(["2", "2", "--client_sizes", "5,5"]) == 0
    folder = seed_files / "data" / "2"
    before = (folder / "local_training_0.json").read_bytes()
    assert main(["2", "2", "--client_sizes", "6,6"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (folder / "local_training_0.json").read_bytes() == before
    assert main(["2", "2", "--client_sizes", "6,6", "--overwrite"]) == 0
    assert len(read(folder, "local_training_0.json")) == 6
    # no temporary left; the lock file stays
    assert sorted(p.name for p in (seed_files / "data").iterdir()) == [".2.lock", "2"]


def test_failure_while_writing_leaves_nothing(seed_files, monkeypatch):
    assert main(["2", "2", "--client_sizes", "5,5"]) == 0
    folder = seed_files / "data" / "2"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(*args, **kwargs):
        raise ValueError("disk full (simulated)")

    monkeypatch.setattr(prep, "save_heatmap", broken)
    assert main(["2", "2", "--client_sizes", "7,7", "--overwrite"]) == 2
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert main(["3", "--output_dir", "fresh"]) == 2
    assert not (seed_files / "fresh").exists()
    assert sorted(p.name for p in (seed_files / "data").iterdir()) == [".2.lock", "2"]


def test_failed_final_rename_puts_the_old_folder_back(seed_files, monkeypatch, capsys):
    assert main(["2", "2", "--client_sizes", "5,5"]) == 0
    folder = seed_files / "data" / "2"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    import rblora.utils.atomic as atomic

    real_replace = atomic.os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError(28, "No space left on device (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    assert main(["2", "2", "--client_sizes", "7,7", "--overwrite"]) == 2
    monkeypatch.undo()
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in (seed_files / "data").iterdir()) == [".2.lock", "2"]
    reference = seed_files / "made_by_mkdir"
    reference.mkdir()
    assert folder.stat().st_mode == reference.stat().st_mode  # not mkdtemp's 0700


#: ``prepare-data 2 2 --client_sizes 7,7 --overwrite``, SIGKILLed between the two renames that
#: replace ``data/2`` (the old folder moved aside, the new one not yet in place).
KILLED_OVERWRITE = """
import os, signal, sys
from rblora.data import load_federated_split
from rblora.data.prepare import main
real = os.replace
def replace(src, dst):
    if ".2.tmp-" in str(src) and str(dst).endswith(os.sep + "2"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
main(["2", "2", "--client_sizes", "7,7", "--overwrite"])
"""


def test_overwrite_killed_between_the_renames_is_recovered_next_start(seed_files, capsys):
    assert main(["2", "2", "--client_sizes", "5,5"]) == 0
    data, folder = seed_files / "data", seed_files / "data" / "2"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(Path(prep.__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", KILLED_OVERWRITE], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = sorted(p.name[:7] for p in data.iterdir())
    assert left == [".2.lock", ".2.old-", ".2.tmp-"]  # the old data only in a hidden folder
    assert main(["2", "2", "--client_sizes", "6,6"]) == 2  # the next start puts it back
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in data.iterdir()) == [".2.lock", "2"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_reading_after_a_killed_overwrite_restores_the_old_folder(seed_files):
    assert main(["2", "2", "--client_sizes", "5,5"]) == 0
    data = seed_files / "data"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    os.replace(data / "2", data / f".2.old-{dead.pid}-0123456789ab")
    (data / f".2.tmp-{dead.pid}-ba9876543210").mkdir()  # the unfinished new folder
    assert load_federated_split(data, 2).client_sizes == [5, 5]
    assert sorted(p.name for p in data.iterdir()) == [".2.lock", "2"]


def test_second_run_waits_for_the_lock_then_finds_the_folder(seed_files, capsys, monkeypatch):
    """Two runs for one folder take turns: the second, waiting while the first holds the lock,
    then finds the folder written and refuses it (no --overwrite), instead of both writing."""
    folder = seed_files / "data" / "2"
    results, waiting, say = [], threading.Event(), prep._say_waiting
    monkeypatch.setattr(prep, "_say_waiting", lambda lock: (say(lock), waiting.set()))
    with exclusive_dir(folder):  # a first run, writing right now
        second = threading.Thread(target=lambda: results.append(main(["2", "2"])))
        second.start()
        assert waiting.wait(60)  # it built its partition and now waits to write it
        second.join(0.3)
        assert second.is_alive() and not folder.exists()
        folder.mkdir()  # what the first run leaves when it is done
    second.join(60)
    assert results == [2]
    err = capsys.readouterr().err
    assert "waiting for another run writing to" in err and "already exists; pass --overwrite" in err
    assert sorted(p.name for p in (seed_files / "data").iterdir()) == [".2.lock", "2"]


def test_leftovers_are_removed_under_the_lock(seed_files):
    data = seed_files / "data"
    # a run killed on another machine sharing the folder, or whose pid is now another process's
    stale = data / f".2.tmp-{os.getppid()}-0123456789ab"
    stale.mkdir(parents=True)
    (stale / "local_training_0.json").write_text("[]")
    assert main(["2", "2"]) == 0
    assert sorted(p.name for p in data.iterdir()) == [".2.lock", "2"]


BAD_INPUT = [
    (["0"], "num_clients must be at least 1, got 0"),
    (["-3"], "num_clients must be at least 1, got -3"),
    (["x"], "num_clients must be an integer, got 'x'"),
    ([], "the number of clients is required"),
    (["200", "1"], "200 clients x 2 shards = 400 shards but only 280 examples"),
    (["300", "2"], "300 clients but only 280 training examples"),
    (["3", "7"], "unknown partition mode '7'; valid: 0 (dirichlet), 1 (shards), 2 (sizes)"),
    (["3", "--partition", "random"], "unknown partition mode 'random'"),
    (["3", "--client_sizes", "1,2"], "--client_sizes has 2 sizes but num_clients is 3"),
    (["3", "--client_sizes", "100,100,100"], "client sizes sum to 300 but only 280"),
    (["3", "0", "--client_sizes", "1,2,3"], "--client_sizes applies to --partition sizes only"),
    (["3", "0", "--min_size", "100"], "min_size 100 x 3 clients exceeds the 280 examples"),
    (["3", "--test_per_category", "30"], "category 'brainstorming' has 30 examples"),
    (["3", "--source", "nowhere"], "unknown source 'nowhere'"),
    (["3", "--source", "digits", "--dolly", "x.json"], "cannot be used with --source digits"),
    (["3", "--dolly", "missing.jsonl"], "Dolly file not found: missing.jsonl"),
    (["3", "--alpaca", "missing.json"], "Alpaca cannot be downloaded on this machine"),
    (["3", "2", "5", "--seed", "1"], "seed given twice with different values: 5 and 1"),
    (["3", "--seed", "1", "4"], "unknown partition mode '4'"),
    (["3", "--bogus"], "unrecognized arguments: --bogus"),
    (["3", "0", "--alpha", "-1e-3"], "Dirichlet alpha must be positive, got -0.001"),
    (["3", "0", "--min_size", "-2"], "min_size must be >= 0, got -2"),
    (["3", "--seed", "-1"], "seed must be >= 0, got -1"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_exit_2_one_message_nothing_written(seed_files, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("prepare-data: error: ") and err.count("\n") == 1
    assert "Traceback" not in err
    assert sorted(p.name for p in seed_files.iterdir()) == [
        "alpaca_data.json",
        "new-databricks-dolly-15k.json",
    ]


def test_malformed_source_names_file_and_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lines = [json.dumps(r) for r in dolly_records(2)]
    lines[5] = lines[5][:-3]  # line 6 cut short
    (tmp_path / "dolly.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["2", "--dolly", "dolly.jsonl"]) == 2
    assert "dolly.jsonl:6: not valid JSON" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dolly.jsonl"]


def test_missing_seed_files_with_source_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["2", "--source", "files"]) == 2
    err = capsys.readouterr().err
    assert "new-databricks-dolly-15k.json" in err and "cannot be downloaded" in err


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "diff_quantity" in capsys.readouterr().out
