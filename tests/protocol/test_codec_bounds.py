"""What a node's reply may hold, judged before anything is built from it: bounded metrics and
arrays described by name, dtype and shape (rblora.protocol.codec)."""

from __future__ import annotations

import json
import re

import pytest

from rblora.protocol.codec import (
    METRICS_MAX_CHARS,
    METRICS_MAX_KEYS,
    check_arrays,
    parse_metrics,
    update_shapes,
)
from rblora.protocol.types import ClientSpec, UpdateLayout, clean_metrics


@pytest.mark.parametrize(
    "text, fragment",
    [
        (json.dumps({"loss": 10**400}), "an integer of 401 digits"),
        ("[" * 100_000 + "]" * 100_000, f"at most {METRICS_MAX_CHARS}"),
        ('{"a": ' * 300 + "1" + "}" * 300, "metrics are nested"),  # within the size bound
        ('{"loss": [1, 2]}', "metrics are nested"),
        (json.dumps({f"m{i}": i for i in range(METRICS_MAX_KEYS + 1)}), "at most 32"),
        ('{"loss": "' + "x" * 65 + '"}', "longer than 64 characters"),
        ("[1, 2]", "a JSON list, not a mapping"),
        ("{not json", "metrics are not JSON"),
        (7, "metrics are int, not JSON text"),
    ],
)
def test_metrics_beyond_their_bounds_are_refused(text, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_metrics(text)


def test_metrics_within_bounds_pass_and_clean_metrics_keeps_the_known_finite_numbers():
    metrics = parse_metrics('{"loss": 0.5, "steps": 3, "seconds": 1e400, "note": "hi"}')
    kept, dropped = clean_metrics(metrics)
    assert kept == {"loss": 0.5, "steps": 3} and sorted(dropped) == ["note", "seconds"]
    assert clean_metrics({"steps": 10**400}) == ({}, ["steps"])  # never converted


def test_arrays_are_judged_from_their_description():
    spec = ClientSpec(0, 4, 16.0, num_examples=5)
    expected = update_shapes(spec, UpdateLayout({"m": (6, 5)}, {"head": (3,)}))
    assert expected == {"update/lora/m/A": (4, 5), "update/lora/m/B": (6, 4),
                        "update/dense/head": (3,)}  # fmt: skip
    good = {k: ("float32", v) for k, v in expected.items()}
    check_arrays(good, expected)
    for change, fragment in [
        ({"update/lora/m/A": ("<U1", (4, 5))}, "dtype <U1, not float32"),
        ({"update/lora/m/A": ("float32", (8, 5))}, "shape (8, 5), expected (4, 5)"),
        ({"update/extra": ("float32", (1,))}, "unexpected arrays [update/extra]"),
    ]:
        with pytest.raises(ValueError, match=re.escape(fragment)):
            check_arrays({**good, **change}, expected)
    with pytest.raises(ValueError, match="missing arrays"):
        check_arrays({k: v for k, v in good.items() if "head" not in k}, expected)
