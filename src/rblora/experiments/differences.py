"""Each method of a comparison against a reference method, item by item (``comparison.md``).

Reads the per-item outcomes the cells' run folders keep (``evaluation/round_<t>.json``, see
``rblora.federation.rundir``), pairs each method's cells with the reference's cells of the same
replicate (seed, or data seed and seed) and computes, per metric and round, the paired difference
with its 95% bootstrap interval and p-value (:mod:`rblora.experiments.paired`). Nothing is
evaluated again: ``rblora report`` rebuilds the same numbers (the bootstrap is seeded).
"""

from __future__ import annotations

from pathlib import Path

from rblora.experiments.paired import (
    BOOTSTRAP_DRAWS,
    BOOTSTRAP_SEED,
    LEVEL,
    match_items,
    paired_difference,
)

#: Outcome lists of a suite that are compared (each gives the metric ``<suite>/<measure>``).
MEASURES = ("accuracy", "acc_norm")


def cell_outcomes(run_dir: Path, rounds: list[dict], label: str) -> dict[int, dict]:
    """Round -> ``{suite: outcomes}`` of one finished cell, for the rounds its metrics hold
    (round 0 aside). Each file is checked against the round's figures in the metrics: an
    outcome file that does not give the same accuracy is stale or foreign (ValueError naming
    it). Rounds without a file (a run of an older version) are left out."""
    from rblora.federation.rundir import RunFolder

    folder = RunFolder(run_dir)
    out = {}
    for r in rounds:
        if r["round"] == 0:
            continue
        suites = folder.read_items(r["round"])
        if suites is None:
            continue
        for suite, data in suites.items():
            for measure in MEASURES:
                figure = r.get(f"{suite}/{measure}")
                if measure not in data or figure is None or not data[measure]:
                    continue
                mean = sum(data[measure]) / len(data[measure])
                if abs(mean - figure) > 1e-9:
                    raise ValueError(
                        f"{label}: {folder.items_path(r['round'])} gives {suite}/{measure} "
                        f"{mean:.4f} but metrics.jsonl {figure:.4f}: the file does not belong "
                        "to this run's round; run the cell again"
                    )
        out[r["round"]] = suites
    return out


def paired_rows(data: dict, reference: tuple[str, str], label) -> list[dict]:
    """One row per (method, metric, round): the method minus the ``reference`` group, over
    the replicates both finished with per-item outcomes. ``label(replicate)`` names one.
    ValueError when two cells of one replicate were scored on different items."""
    groups = data["groups"]
    ref = groups[reference]["items"]
    rows = []
    for key, group in groups.items():
        if key == reference:
            continue
        rounds = sorted(set(group["items"]) & set(ref))
        for t in rounds:
            common = [rep for rep in group["items"][t] if rep in ref[t]]
            suites = sorted(
                {s for rep in common for s in group["items"][t][rep] if s in ref[t][rep]}
            )
            for suite in suites:
                for measure in MEASURES:
                    pairs, used = [], []
                    for rep in common:
                        x = group["items"][t][rep].get(suite)
                        y = ref[t][rep].get(suite)
                        if x is None or y is None or measure not in x or measure not in y:
                            continue
                        what = (
                            f"{key[1]} ({key[0]}) and {reference[1]} ({reference[0]}), "
                            f"{label(rep)}, round {t}, suite {suite}"
                        )
                        pairs.append(match_items(x, y, measure, what))
                        used.append(rep)
                    if not pairs:
                        continue
                    result = paired_difference(pairs)
                    row = {"setting": key[0], "method": key[1], "metric": f"{suite}/{measure}",
                           "round": t, **result.to_dict(), "reading": result.reading()}  # fmt: skip
                    row["replicates"] = [label(rep) for rep in used]  # which, not how many
                    rows.append(row)
    return rows


def paired_json(rows: list[dict], reference: tuple[str, str]) -> dict:
    return {
        "reference": {"setting": reference[0], "method": reference[1]},
        "bootstrap": {"draws": BOOTSTRAP_DRAWS, "seed": BOOTSTRAP_SEED, "level": LEVEL},
        "rows": rows,
    }


def paired_table(rows: list[dict], reference: tuple[str, str], last: int) -> str:
    """The markdown table of the ``*/accuracy`` rows after round ``last``."""
    shown = [r for r in rows if r["round"] == last and r["metric"].endswith("/accuracy")]
    if not shown:
        return ""
    head = ["setting", "method", "metric", "replicates", "difference", "95% interval", "p",
            "test", "reading"]  # fmt: skip
    lines = [
        f"## Paired differences to {reference[1]} ({reference[0]}), after round {last}",
        "",
        "Method minus reference on the same items (and replicates); 95% interval of a paired "
        "bootstrap (items; replicates and items when there are several); p: McNemar's exact "
        "test (one replicate) or the bootstrap's (several).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in shown:
        reps = r["replicates"]
        cells = [
            r["setting"], r["method"], r["metric"], f"{len(reps)}: {', '.join(reps)}",
            f"{r['difference']:+.3f}", f"[{r['low']:+.3f}, {r['high']:+.3f}]", f"{r['p']:.3g}",
            f"{r['test']} (b={r['b']}, c={r['c']})" if r["test"].startswith("McNemar")
            else r["test"],
            r["reading"],
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
