"""End-of-run outputs from ``metrics.jsonl``: ``results.json``, ``summary.md`` and PNG plots.

Works on the metric records alone (no model), so ``rblora report`` can rebuild them for any run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rblora.utils.atomic import write_json, write_text

_SUITE_METRICS = ("accuracy", "acc_norm", "macro_accuracy")
CI_SUFFIX = "_ci95"


def ci95(p: float, n: int) -> float:
    """Half-width of the 95% interval of an accuracy ``p`` measured on ``n`` questions (normal
    approximation of the binomial: 1.96 sqrt(p (1 - p) / n)); the sampling noise of a figure."""
    return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / n)


def scalar_evals(evaluation: dict[str, Any] | None) -> dict[str, float]:
    """Flatten a round's evaluation into ``name -> value`` for tables and plots.

    ``{"suites": {"mmlu": {"accuracy": ...}}, "loss": ...}`` gives ``mmlu/accuracy`` and
    ``heldout/loss``; other top-level numbers (timings, counts) are left out.
    """
    flat: dict[str, float] = {}
    evaluation = evaluation or {}
    for suite, value in (evaluation.get("suites") or {}).items():
        for key in _SUITE_METRICS:
            if isinstance(value.get(key), (int, float)):
                flat[f"{suite}/{key}"] = float(value[key])
        if isinstance(value.get("accuracy"), (int, float)) and value.get("count"):
            flat[f"{suite}/accuracy{CI_SUFFIX}"] = ci95(value["accuracy"], value["count"])
    for key in ("loss", "perplexity"):
        if isinstance(evaluation.get(key), (int, float)):
            flat[f"heldout/{key}"] = float(evaluation[key])
    personal = evaluation.get("personalized") or {}  # --eval_personalized (federation.personal)
    for key in PERSONAL_FIGURES:
        if isinstance(personal.get(key), (int, float)):
            flat[f"personalized/{key}"] = float(personal[key])
    return flat


PERSONAL_FIGURES = ("accuracy_mean", "accuracy_sd", "loss_mean", "loss_sd", "clients")
"""The figures of ``--eval_personalized`` a round reports (``personalized/<name>``)."""


def summarize(records: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    rounds = [r for r in records if r.get("type") == "round"]
    clients = [r for r in records if r.get("type") == "client"]
    per_round = []
    for r in rounds:
        per_round.append(
            {
                "round": r["round"],
                "train_loss": r.get("train_loss"),
                "bytes_up": r.get("bytes_up"),
                "bytes_down": r.get("bytes_down"),
                "round_seconds": r.get("round_seconds"),
                "aggregate_seconds": r.get("aggregate_seconds"),
                "eval_seconds": r.get("eval_seconds"),
                **({"dp_epsilon": r.get("dp_epsilon")} if "dp_epsilon" in r else {}),
                **scalar_evals(r.get("eval")),
            }
        )
    return {
        "method": config.get("method"),
        "reduction": rounds[-1].get("reduction") if rounds else None,
        "global_model": config.get("global_model") or config.get("base_model"),
        "num_clients": config.get("num_clients"),
        "client_ranks": config.get("client_ranks_resolved"),
        "rounds_completed": sum(1 for r in rounds if r["round"] >= 1),  # round 0: the base model
        "final": per_round[-1] if per_round else {},
        "rounds": per_round,
        "clients": clients,
        "total_bytes_up": sum(r.get("bytes_up") or 0 for r in rounds),
        "total_bytes_down": sum(r.get("bytes_down") or 0 for r in rounds),
        "total_seconds": sum(r.get("round_seconds") or 0 for r in rounds),
        "privacy": _privacy(config, rounds),
    }


def _privacy(config: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run's client-level DP settings (config.json's ``privacy``, public) and the epsilon
    spent by its last round (None: off). A run of an older version recorded fewer settings."""
    if config.get("dp_clip") is None and config.get("privacy") is None:
        return None
    spent = [r["dp_epsilon"] for r in rounds if "dp_epsilon" in r]
    settings = config.get("privacy") or {
        "clip": config.get("dp_clip"),
        "noise_multiplier": config.get("dp_noise_multiplier_resolved"),
        "target_epsilon": config.get("dp_epsilon"),
        "delta": config.get("dp_delta"),
        "accountant": config.get("dp_accountant"),
        "sample_rate": config.get("dp_sample_rate"),
    }
    return {**settings, "epsilon": spent[-1] if spent else None}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(results: dict[str, Any]) -> str:
    rows = results["rounds"]
    if not rows:
        return "(no completed round)\n"
    metric_keys = sorted({k for r in rows for k in r if "/" in k and not k.endswith(CI_SUFFIX)})
    private = any("dp_epsilon" in r for r in rows)
    # under DP the loss of the clients, the bytes and the time are not released
    released = private or results.get("privacy") is not None
    head = ["round", *([] if released else ["train_loss"]), *metric_keys]
    head += ["DP epsilon"] if private else []
    head += [] if released else ["MB up", "MB down", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["round"]), *([] if released else [_fmt(r.get("train_loss"))])]
        for k in metric_keys:  # accuracies with their 95% sampling interval
            ci = r.get(k + CI_SUFFIX)
            cells.append(_fmt(r.get(k)) + (f" ± {ci:.3f}" if ci is not None else ""))
        if private:  # no noise: no guarantee ("inf"); round 0 (the base model): "-"
            eps = r.get("dp_epsilon")
            cells.append("-" if "dp_epsilon" not in r else "inf" if eps is None else f"{eps:.3g}")
        cells += [] if released else [
            f"{(r.get('bytes_up') or 0) / 2**20:.1f}",
            f"{(r.get('bytes_down') or 0) / 2**20:.1f}",
            f"{r.get('round_seconds') or 0:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(run_dir: Path, results: dict[str, Any]) -> None:
    text = [
        f"# {results['method']} on {results['global_model']}",
        "",
        f"- clients: {results['num_clients']}, ranks {results['client_ranks']}",
        f"- redistribution: {results['reduction']}",
        f"- rounds completed: {results['rounds_completed']}",
        *_costs(results),
        *_privacy_line(results.get("privacy")),
        "",
        markdown_table(results),
    ]
    write_text(run_dir / "summary.md", "\n".join(text))


def _costs(results: dict[str, Any]) -> list[str]:
    """Communication and time, or under DP where they are (they reveal who took part)."""
    if results.get("privacy"):
        return ["- communication, time and client losses: kept private under DP (private/)"]
    return [
        f"- total communication: {results['total_bytes_up'] / 2**20:.1f} MB up, "
        f"{results['total_bytes_down'] / 2**20:.1f} MB down",
        f"- wall time of the rounds: {results['total_seconds']:.0f} s",
    ]


def _privacy_line(dp: dict[str, Any] | None) -> list[str]:
    if not dp:
        return []
    if dp.get("guarantee") is False:
        eps = "null: NO GUARANTEE (" + (
            "noise drawn from the public seed)" if dp.get("noise_multiplier") else "no noise)"
        )
    else:
        eps = "inf (no noise)" if dp["epsilon"] is None else f"{dp['epsilon']:.4g}"
    z = dp["noise_multiplier"]
    q = dp.get("sample_rate")
    sampling = f"sampling rate {'-' if q is None else format(q, '.4g')}"
    if dp.get("sampling"):
        sampling = (
            f"{dp['sampling']} sampling at {q:.4g}, accounted at {dp['accounting_sample_rate']:.4g}"
        )
    clip = f"clip {dp['clip']:g}"
    if dp.get("adaptive_clip"):
        clip = f"adaptive clip from {dp['clip']:g} (quantile {dp['adaptive_clip']['quantile']:g})"
    return [
        f"- client-level DP: epsilon {eps} at delta {dp['delta']:g} ({dp['accountant']} "
        f"accountant), {clip}, noise multiplier {'-' if z is None else format(z, '.4g')}, "
        f"{sampling}"
    ]


def write_plots(run_dir: Path, results: dict[str, Any]) -> list[Path]:
    """One PNG per metric family (accuracy, loss) against the round."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = results["rounds"]
    if not rows:
        return []
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []
    rounds = [r["round"] for r in rows]
    families = {
        "accuracy": [k for k in rows[-1] if k.endswith("/accuracy")],
        "loss": ["train_loss"] + [k for k in rows[-1] if k.endswith("/loss")],
    }
    for family, keys in families.items():
        keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            ax.plot(rounds, [r.get(key) for r in rows], marker="o", label=key)
        ax.set_xlabel("round")
        ax.set_ylabel(family)
        ax.set_title(f"{results['method']}: {family} per round")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{family}.png"
        tmp = path.with_name(f".tmp-{path.name}")
        fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written


def write_confusion(run_dir: Path, records: list[dict[str, Any]]) -> Path | None:
    """``plots/confusion.png``: the last round's confusion matrix (classification tasks)."""
    last = next((r for r in reversed(records) if r.get("type") == "round" and r.get("eval")), None)
    evaluation = (last or {}).get("eval") or {}
    matrix, classes = evaluation.get("confusion_matrix"), evaluation.get("classes")
    if not matrix or not classes:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(matrix, dtype=float)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(5, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if counts[i, j]:
                color = "white" if rows[i, j] > 0.5 else "black"
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                        color=color)  # fmt: skip
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"round {last['round']}: confusion (row-normalised colour, counts)")
    fig.tight_layout()
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    path = out / "confusion.png"
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(run_dir: Path, records: list[dict[str, Any]], config: dict[str, Any]) -> dict:
    results = summarize(records, config)
    write_json(run_dir / "results.json", results)
    write_summary(run_dir, results)
    write_plots(run_dir, results)
    write_confusion(run_dir, records)
    return results
