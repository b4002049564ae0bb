"""rblora compare: paired differences to a reference method, data seeds as replicates."""

from __future__ import annotations

import json

import numpy as np
import pytest
from run_helpers import lm_argv

from rblora.cli import main as rblora
from rblora.experiments.paired import mcnemar_exact


def _base(workspace, tmp_path, rounds=1):
    argv = lm_argv(workspace, tmp_path / "unused", num_communication_rounds=rounds)
    i = argv.index("--output_dir")
    del argv[i : i + 2]
    return argv


def _items(root, cell_path, t):
    data = json.loads((root / cell_path / "3" / "evaluation" / f"round_{t}.json").read_text())
    return data["suites"]["dev"]


def _pair(root, x_path, y_path, t, measure="accuracy"):
    x, y = _items(root, x_path, t), _items(root, y_path, t)
    assert x["ids"] == y["ids"]  # the same questions, in the same order here
    return np.array(x[measure]), np.array(y[measure])


def test_one_seed_gives_mcnemar_and_report_rebuilds_it(workspace, tmp_path, capsys):
    root = tmp_path / "cmp"
    argv = ["compare", "--methods", "FLoRA,RB-LoRA,Weighted HETLoRA", "--seeds", "1"]
    argv += ["--output_dir", str(root), "--", *_base(workspace, tmp_path)]
    assert rblora(argv) == 0
    out = capsys.readouterr().out
    table = (root / "comparison.md").read_text()
    assert "## Paired differences to RB-LoRA (heterogeneous), after round 1" in table
    assert "- replicates: seeds 1 (one data partition" in table
    paired = json.loads((root / "comparison.json").read_text())
    assert paired["reference"] == {"setting": "heterogeneous", "method": "RB-LoRA"}
    rows = {(r["method"], r["metric"], r["round"]): r for r in paired["rows"]}
    # every method but the reference, both measures, every round
    assert set(rows) == {
        (m, f"dev/{k}", t)
        for m in ("FLoRA", "Weighted HETLoRA")
        for k in ("accuracy", "acc_norm")
        for t in (1,)
    }
    for (method, metric, t), row in rows.items():  # by hand from the cells' outcome files
        x, y = _pair(
            root,
            f"heterogeneous/{method.lower().replace(' ', '-')}/seed1",
            "heterogeneous/rb-lora/seed1",
            t,
            metric.split("/")[1],
        )
        b, c = int(np.sum((x == 1) & (y == 0))), int(np.sum((x == 0) & (y == 1)))
        assert row["difference"] == pytest.approx(x.mean() - y.mean())
        assert (row["b"], row["c"], row["items"]) == (b, c, 6)
        assert row["test"] == "McNemar exact" and row["p"] == mcnemar_exact(b, c)
        assert row["low"] <= row["difference"] <= row["high"]
        assert row["replicates"] == ["seed 1"]
    start = "| heterogeneous | FLoRA | dev/accuracy | 1: seed 1 |"
    flora = next(line for line in table.splitlines() if line.startswith(start))
    assert "McNemar exact (b=" in flora and flora in out

    # report rebuilds the same table and JSON from the stored outcomes, without evaluating
    import rblora.federation.rounds as rounds

    before = (root / "comparison.json").read_text()
    (root / "comparison.md").unlink()
    (root / "comparison.json").unlink()
    original = rounds.evaluate_global
    rounds.evaluate_global = None  # anything evaluating would fail
    try:
        assert rblora(["report", str(root)]) == 0
    finally:
        rounds.evaluate_global = original
    assert (root / "comparison.md").read_text() == table
    assert (root / "comparison.json").read_text() == before

    # another reference: the differences change sign
    assert rblora(["report", str(root), "--reference", "FLoRA"]) == 0
    again = json.loads((root / "comparison.json").read_text())
    flipped = {(r["method"], r["metric"], r["round"]): r for r in again["rows"]}
    row = flipped[("RB-LoRA", "dev/accuracy", 1)]
    assert row["difference"] == pytest.approx(-rows[("FLoRA", "dev/accuracy", 1)]["difference"])
    assert (row["b"], row["c"]) == (
        rows[("FLoRA", "dev/accuracy", 1)]["c"],
        rows[("FLoRA", "dev/accuracy", 1)]["b"],
    )
    assert "## Paired differences to FLoRA" in (root / "comparison.md").read_text()
    assert rblora(["report", str(root), "--reference", "FLoRA@heterogeneous"]) == 0  # the same
    assert json.loads((root / "comparison.json").read_text())["rows"] == again["rows"]

    # a bad reference: one line naming it and the valid ones
    capsys.readouterr()
    assert rblora(["report", str(root), "--reference", "FlexLoRA"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reference 'FlexLoRA'" in err[0], err
    assert "valid: FLoRA, RB-LoRA, Weighted HETLoRA" in err[0]

    # two cells scored on different items are refused, naming them
    path = root / "heterogeneous" / "flora" / "seed1" / "3" / "evaluation" / "round_1.json"
    data = json.loads(path.read_text())
    data["suites"]["dev"]["ids"][0] = "0" * 16
    path.write_text(json.dumps(data))
    assert rblora(["report", str(root)]) == 2
    err = capsys.readouterr().err
    assert "FLoRA (heterogeneous) and RB-LoRA (heterogeneous), seed 1, round 1, suite dev" in err
    assert "scored on different items" in err

    # an outcome file that does not give the round's figure is not this round's
    data = json.loads(path.read_text())
    data["suites"]["dev"]["ids"][0] = _items(root, "heterogeneous/rb-lora/seed1", 1)["ids"][0]
    data["suites"]["dev"]["accuracy"][0] = 1 - data["suites"]["dev"]["accuracy"][0]
    path.write_text(json.dumps(data))
    assert rblora(["report", str(root)]) == 2
    assert "does not belong to this run's round" in capsys.readouterr().err


def test_compare_refuses_a_bad_reference_before_running(workspace, tmp_path, capsys):
    argv = ["compare", "--methods", "RB-LoRA,FLoRA", "--seeds", "1", "--reference", "FedIT"]
    argv += ["--output_dir", str(tmp_path / "cmp"), "--", *_base(workspace, tmp_path)]
    assert rblora(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "rblora compare: error: --reference 'FedIT' is not a method of this comparison; "
        "valid: RB-LoRA, FLoRA (or method@setting: RB-LoRA@heterogeneous, "
        "FLoRA@heterogeneous)"
    ]
    assert not (tmp_path / "cmp").exists()


def test_data_seeds_are_replicates(workspace, tmp_path, capsys):
    root = tmp_path / "cmp"
    argv = ["compare", "--methods", "RB-LoRA,FLoRA", "--seeds", "1", "--data_seeds", "1,2"]
    argv += ["--reference", "FLoRA", "--output_dir", str(root), "--"]
    argv += _base(workspace, tmp_path)
    assert rblora(argv) == 0
    err = capsys.readouterr().err
    assert "data seed 2: preparing" in err
    # data seed 1 is the workspace's own folder (prepared with seed 1); seed 2 is prepared
    # with the same options
    given = json.loads((workspace / "data" / "3" / "partition.json").read_text())
    made = json.loads((root / "data" / "seed2" / "3" / "partition.json").read_text())
    assert given["seed"] == 1 and made["seed"] == 2
    same = ("seed", "output_dir", "overwrite")
    assert {k: v for k, v in made["arguments"].items() if k not in same} == {
        k: v for k, v in given["arguments"].items() if k not in same
    }
    assert made["client_sizes"] == given["client_sizes"]
    index = json.loads((root / "compare.json").read_text())
    assert [(c["method"], c.get("data_seed"), c["seed"]) for c in index["cells"]] == [
        ("RB-LoRA", 1, 1), ("RB-LoRA", 2, 1), ("FLoRA", 1, 1), ("FLoRA", 2, 1)
    ]  # fmt: skip
    cells = {(c["method"], c["data_seed"]): c for c in index["cells"]}
    for (method, data_seed), cell in cells.items():
        config = json.loads((root / cell["path"] / "3" / "config.json").read_text())
        want = workspace / "data" if data_seed == 1 else root / "data" / "seed2"
        assert config["data_path"] == str(want) and cell["path"].endswith(f"data{data_seed}/seed1")
        # each data seed's first cell evaluates the base model on its own data
        assert (root / cell["path"] / "3" / "evaluation" / "round_0.json").is_file() == (
            method == "RB-LoRA"
        )

    table = (root / "comparison.md").read_text()
    assert "- replicates: (data seed, seed) pairs (1, 1), (2, 1)" in table
    assert "| heterogeneous | RB-LoRA | 2 |" in table
    assert "| setting | method | replicates |" in table
    paired = json.loads((root / "comparison.json").read_text())
    row = next(r for r in paired["rows"] if r["metric"] == "dev/accuracy")
    assert row["method"] == "RB-LoRA" and row["replicates"] == ["data 1 seed 1", "data 2 seed 1"]
    assert row["test"] == "bootstrap" and row["items"] == 12
    diffs = []
    for d in (1, 2):
        x, y = _pair(root, cells[("RB-LoRA", d)]["path"], cells[("FLoRA", d)]["path"], 1)
        diffs.append(x.mean() - y.mean())
    assert row["difference"] == pytest.approx(np.mean(diffs))
    assert "2: data 1 seed 1, data 2 seed 1" in table and "| bootstrap |" in table

    # run again: the prepared folder is taken as it is, the cells are kept
    assert rblora(argv) == 0
    err = capsys.readouterr().err
    assert "prepared earlier, same options" in err and err.count("finished earlier, kept") == 4

    # a folder prepared with other options is refused, naming what differs
    path = root / "data" / "seed2" / "3" / "partition.json"
    made["arguments"]["test_per_category"] = 3
    path.write_text(json.dumps(made))
    assert rblora(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test_per_category differ" in err[0], err


@pytest.mark.parametrize("value", ["1,1", "-1", "x", ""])
def test_compare_refuses_bad_data_seeds(workspace, tmp_path, capsys, value):
    argv = ["compare", "--methods", "RB-LoRA", "--seeds", "1", "--data_seeds", value]
    argv += ["--output_dir", str(tmp_path / "cmp"), "--", *_base(workspace, tmp_path)]
    assert rblora(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data_seeds" in err[0], err
    assert not (tmp_path / "cmp").exists()


def test_a_comparison_header_cuts_the_ranks_of_thousands_of_clients():
    from rblora.experiments.compare import shown_option

    ranks = ",".join(str(r) for r in [4, 16, 64, 128, 256] * 2000)
    assert shown_option(ranks) == "4,16,64,128,256,4,16,64,128,256,... (10000 values)"
    assert shown_option("4,8,16") == "4,8,16"
    assert shown_option("--client_ranks") == "--client_ranks"


def test_a_comparison_split_over_calls_tables_every_part(workspace, tmp_path, capsys):
    """Calls on one folder with the same options, each on its own methods (as processes that
    share the work do), fill one table: a later part without RB-LoRA still pairs to it."""
    root = tmp_path / "cmp"
    base = _base(workspace, tmp_path)

    def part(methods, *extra):
        argv = ["compare", "--methods", methods, "--seeds", "1", *extra]
        return rblora([*argv, "--output_dir", str(root), "--", *base])

    assert part("FLoRA") == 0
    assert part("RB-LoRA") == 0
    assert part("Weighted HETLoRA") == 0  # the part that used to fail at its table
    index = json.loads((root / "compare.json").read_text())
    assert [c["method"] for c in index["cells"]] == ["FLoRA", "RB-LoRA", "Weighted HETLoRA"]
    paired = json.loads((root / "comparison.json").read_text())
    assert paired["reference"] == {"setting": "heterogeneous", "method": "RB-LoRA"}
    assert {r["method"] for r in paired["rows"]} == {"FLoRA", "Weighted HETLoRA"}
    table = (root / "comparison.md").read_text()
    for method in ("FLoRA", "RB-LoRA", "Weighted HETLoRA"):
        assert f"| heterogeneous | {method} | 1 |" in table
    # a reference of an earlier part is valid, and kept by a later call that names none
    assert part("FLoRA", "--reference", "Weighted HETLoRA") == 0
    assert part("RB-LoRA") == 0
    assert json.loads((root / "comparison.json").read_text())["reference"]["method"] == (
        "Weighted HETLoRA"
    )
    capsys.readouterr()
    # other train options: a new comparison, the old cells no longer listed (said in the log)
    argv = ["compare", "--methods", "RB-LoRA", "--seeds", "2", "--output_dir", str(root), "--"]
    assert rblora([*argv, *base, "--local_learning_rate", "0.002"]) == 0
    assert "listed a comparison with other train options: replaced" in capsys.readouterr().err
    index = json.loads((root / "compare.json").read_text())
    assert [(c["method"], c["seed"]) for c in index["cells"]] == [("RB-LoRA", 2)]


def test_merge_index_adds_cells_once_and_joins_data_seeds():
    from rblora.experiments.compare import merge_index

    def index(paths, data_seeds=None, reference=None, argv=("--x",)):
        cells = [{"path": p, "method": p.split("/")[0]} for p in paths]
        return {"base_argv": list(argv), "cells": cells, "num_clients": 3, "rounds": 1,
                "reference": reference, "data_seeds": data_seeds}  # fmt: skip

    earlier = index(["a/data1/seed1", "b/data1/seed1"], [1], reference="b")
    merged = merge_index(earlier, index(["b/data1/seed1", "a/data2/seed1"], [2]))
    assert [c["path"] for c in merged["cells"]] == [
        "a/data1/seed1",
        "b/data1/seed1",
        "a/data2/seed1",
    ]
    assert merged["data_seeds"] == [1, 2] and merged["reference"] == "b"
    assert merge_index(earlier, index(["c/data1/seed1"], [1], reference="c"))["reference"] == "c"
    # a different comparison is replaced: other options, or data seeds against none
    other = index(["c/seed1"], argv=("--y",))
    assert merge_index(earlier, other) == other
    plain = index(["c/seed1"])
    assert merge_index(earlier, plain) == plain
    assert merge_index(None, plain) == plain
