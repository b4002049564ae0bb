"""--eval_personalized on the Flower engine: each node scores its own client's model on its own
held-out split (the in-process engine's function), the server checks what comes back; the
figures equal the in-process engine's."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from flwr.app import Message
from run_helpers import lm_argv, metrics

from rblora.federation import cli
from rblora.flower.records import to_content
from rblora.flower.server_app import HeteroRankStrategy


def _personal(run):
    return {r["round"]: r["eval"]["personalized"] for r in metrics(run) if r["type"] == "round"}


def test_simulation_gives_the_in_process_figures(local_ws, tmp_path):
    argv = ["--eval_personalized"]
    assert cli.main(lm_argv(local_ws, tmp_path / "a", *argv)) == 0
    assert cli.main(lm_argv(local_ws, tmp_path / "b", *argv, "--engine", "flower")) == 0
    ours, theirs = _personal(tmp_path / "b" / "3"), _personal(tmp_path / "a" / "3")
    for t in (1, 2):
        assert ours[t]["clients"] == theirs[t]["clients"] == 3 and "missing" not in ours[t]
        for key in ("loss_mean", "loss_sd"):
            assert math.isclose(ours[t][key], theirs[t][key], rel_tol=1e-4, abs_tol=1e-6), key


def _reply(figures) -> Message:
    content = to_content({}, {"figures": json.dumps(figures)})
    return SimpleNamespace(has_error=lambda: False, content=content)


@pytest.mark.parametrize(
    ("figures", "message"),
    [
        ({"loss": 1.0, "examples": 5}, "scored 5 held-out examples; partition.json says 3"),
        ({"loss": 1.0}, "does not say how many examples"),
        ({"loss": -2.0, "examples": 3}, "loss -2.0 must be >= 0"),
        (None, "holds 3 held-out examples but reported none"),
        ({"accuracy": 0.5, "examples": 3, "other": 1}, "unknown personalised figure 'other'"),
    ],
)
def test_the_server_checks_a_nodes_figures_against_what_it_knows(figures, message):
    strategy = SimpleNamespace(_local_sizes=[3, 0])
    with pytest.raises(ValueError, match=message):
        HeteroRankStrategy.take_figures(strategy, 0, _reply(figures))
    good = {"loss": 1.0, "accuracy": 0.5, "examples": 3}
    assert HeteroRankStrategy.take_figures(strategy, 0, _reply(good)) == good
    assert HeteroRankStrategy.take_figures(strategy, 1, _reply(None)) is None
    with pytest.raises(ValueError, match="partition.json says 0"):
        HeteroRankStrategy.take_figures(strategy, 1, _reply(good))


def test_figures_nested_past_the_parsers_depth_are_refused_as_a_value():
    strategy = SimpleNamespace(_local_sizes=None)
    reply = SimpleNamespace(
        has_error=lambda: False, content=to_content({}, {"figures": "[" * 400 + "]" * 400})
    )
    with pytest.raises(ValueError, match="must be a mapping"):
        HeteroRankStrategy.take_figures(strategy, 0, reply)
    too_long = SimpleNamespace(
        has_error=lambda: False, content=to_content({}, {"figures": " " * 2000})
    )
    with pytest.raises(ValueError, match="no readable figures"):
        HeteroRankStrategy.take_figures(strategy, 0, too_long)
