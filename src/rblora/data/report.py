"""Human-readable views of a partition: a text table and a clients x categories heatmap."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rblora.data.partition import category_entropy

#: Print per-category counts in the table only up to this many categories.
MAX_TABLE_CATEGORIES = 12
#: With more clients than this, the table shows the first ``SHOWN_CLIENTS`` rows and a line of
#: size quantiles, and the heatmap labels its client axis with a few ticks, not every row.
MAX_TABLE_CLIENTS = 50
SHOWN_CLIENTS = 20
#: The heatmap draws at most this many clients (the first ones): a figure has room for about one
#: pixel row per client up to here, and more rows would be blended into a uniform colour.
MAX_HEATMAP_CLIENTS = 200


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 1] + "~"


def summary_table(histogram: np.ndarray, categories: Sequence[str]) -> str:
    """A fixed-width table, one row per client: size, category entropy (bits) and either the
    count of every category (few categories) or the three largest ones. With more than
    ``MAX_TABLE_CLIENTS`` clients only the first ``SHOWN_CLIENTS`` rows, then the number left
    out and the quantiles of the client sizes.

    ``histogram``: ``(K, C)`` counts.
    """
    hist = np.asarray(histogram)
    sizes = hist.sum(axis=1)
    entropy = category_entropy(hist)
    total = max(int(sizes.sum()), 1)
    wide = len(categories) <= MAX_TABLE_CATEGORIES
    cw = 8
    head = f"{'client':>6} {'size':>7} {'share':>6} {'H bits':>6}"
    if wide:
        head += " " + " ".join(f"{_short(c, cw):>{cw}}" for c in categories)
    else:
        head += "  largest categories"
    lines = [head, "-" * len(head)]
    shown = len(hist) if len(hist) <= MAX_TABLE_CLIENTS else SHOWN_CLIENTS
    for k, row in enumerate(hist[:shown]):
        line = f"{k:>6} {int(sizes[k]):>7} {sizes[k] / total:>6.1%} {entropy[k]:>6.2f}"
        if wide:
            line += " " + " ".join(f"{int(v):>{cw}}" for v in row)
        else:
            top = np.argsort(-row, kind="stable")[:3]
            line += "  " + ", ".join(f"{categories[c]} {int(row[c])}" for c in top if row[c])
        lines.append(line)
    if shown < len(hist):
        q = np.percentile(sizes, [0, 10, 50, 90, 100]).astype(int)
        lines.append(
            f"   ... {len(hist) - shown} more clients (partition.json lists them all); sizes: min "
            f"{q[0]}, 10% {q[1]}, median {q[2]}, 90% {q[3]}, max {q[4]}, mean "
            f"{sizes.mean():.1f}, entropy mean {entropy.mean():.2f} bits"
        )
    foot = (
        f"{'all':>6} {total:>7} {1:>6.0%} {category_entropy(hist.sum(0, keepdims=True))[0]:>6.2f}"
    )
    if wide:
        foot += " " + " ".join(f"{int(v):>{cw}}" for v in hist.sum(axis=0))
    lines += ["-" * len(head), foot]
    if wide and any(len(c) > cw for c in categories):
        lines.append("columns: " + ", ".join(categories))
    return "\n".join(lines)


def save_heatmap(
    histogram: np.ndarray, categories: Sequence[str], path: Path, title: str = ""
) -> None:
    """Write a PNG heatmap of ``histogram`` ``(K, C)``: colour = share of the client's data in
    each category, numbers = counts (when the grid is small enough to read). Of more than
    ``MAX_HEATMAP_CLIENTS`` clients the first ones are drawn, and the title says so.

    Uses matplotlib's object API with the Agg canvas directly, so no pyplot backend or other
    process-wide matplotlib state is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    hist = np.asarray(histogram, dtype=np.float64)
    if hist.shape[0] > MAX_HEATMAP_CLIENTS:
        title = f"{title} (first {MAX_HEATMAP_CLIENTS} of {hist.shape[0]} clients)".strip()
        hist = hist[:MAX_HEATMAP_CLIENTS]
    k, c = hist.shape
    shares = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(min(2 + 0.55 * c, 24), min(1.5 + 0.35 * k, 24)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(
        shares, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest"
    )
    ax.set_xticks(range(c), [_short(x, 18) for x in categories], rotation=60, ha="right")
    if k <= MAX_TABLE_CLIENTS:
        ax.set_yticks(range(k), [str(i) for i in range(k)])
    else:  # a label per row would be unreadable, and takes minutes to lay out at 10,000
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.set_xlabel("category")
    ax.set_ylabel("client")
    if k * c <= 400:
        for i in range(k):
            for j in range(c):
                if hist[i, j]:
                    colour = "black" if shares[i, j] > 0.6 else "white"
                    ax.text(
                        j,
                        i,
                        str(int(hist[i, j])),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color=colour,
                    )
    fig.colorbar(image, ax=ax, label="share of client's examples")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
