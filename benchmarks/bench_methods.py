"""The comparison of methods this project exists for: every method, 3 seeds, one table.

    .venv/bin/python benchmarks/bench_methods.py lm              # 21 cells, ~20 min each on 1 core
    .venv/bin/python benchmarks/bench_methods.py image           # ~42 min on 1 core (24 cells)
    .venv/bin/python benchmarks/bench_methods.py lm --quick      # about a minute (what tests run)
    .venv/bin/python benchmarks/bench_methods.py image --seeds 1,2 --data_seeds 1,2
    .venv/bin/python benchmarks/bench_methods.py image-personal  # + each client's own test split
    .venv/bin/python benchmarks/bench_methods.py image-sweep     # 3 rank spreads x 3 methods x 3
    .venv/bin/python benchmarks/bench_methods.py image-privacy   # no DP + 3 epsilons x 3 x 3
    .venv/bin/python benchmarks/bench_methods.py image-privacy-large   # 10,000 clients, hours

Prepares the data of the setting under ``<output_dir>/data`` (once), then runs ``rblora
compare`` (``rblora.experiments.compare``) with the same hyperparameters for every method and
writes ``<output_dir>/comparison.md`` and ``<output_dir>/plots/``. Killed, it resumes where it
stopped (finished cells are kept).

- ``lm``: SmolLM2-135M-Instruct on the embedded sentiment/NLI mixture of the main job
  (``make run``: the prepare-data options of the Makefile's ``run`` target, but 150 held-out
  questions per task, 600 in all, and its config), 10 clients with ranks
  [4, 4, 8, 8, 16, 16, 32, 32, 64, 64], 3 rounds; every registered method with heterogeneous
  ranks, FedIT (one rank only) with every client at rank 4.
- ``image``: DINOv2 ViT-S/14 on Fashion-MNIST, 10 Dirichlet-0.5 clients, the seed's ranks,
  3 rounds at 84 px; every method, FedIT at rank 4, and the head-only baseline.
- ``image-personal``: the image setting with a fifth of each client's images held out and
  ``--eval_personalized`` (each client's own model scored on them, every round); seven methods
  including FedSA-LoRA, which has no global model.
- ``image-sweep``: the image setting, RB-LoRA, FlexLoRA and Weighted HETLoRA, with about the
  same total rank (936) spread three ways: every client at 94, the seed's ranks, seven clients
  at 24 and three at 256.
- ``image-privacy``: client-level DP on the image task with 50 Dirichlet-0.5 clients (the
  seed's ranks five times), each taking part with probability 0.2 (Poisson sampling, the
  sampling the accountant analyses), 5 rounds; RB-LoRA, FlexLoRA and Weighted HETLoRA without
  DP and at epsilon inf (clip, no noise), 8 and 2 (delta 1e-5), one comparison per level in
  ``<output_dir>/epsilon_<level>`` (``epsilon_none``: without DP), then a table and
  ``plots/privacy_utility.png``; each level is named by the epsilon its runs recorded.
- ``image-privacy-large``: the same at cross-device scale (docs/scale.md): 10,000 Dirichlet-0.5
  clients of about 6 images, Poisson q = 0.1 (about 1,000 a round), 10 rounds at 56 px, every
  private level with adaptive clipping (the median), delta 1e-6; no DP, clip only, epsilon 8
  and 2; RB-LoRA, FlexLoRA and Weighted HETLoRA, seeds 1 and 2 (about 8 hours of one core).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rblora.aggregation import available_methods, get_method

ROOT = Path(__file__).resolve().parents[1]
# every heterogeneous-rank method with a global model, with the options' ranks; FedIT (one rank
# only) with every client at the smallest of them. The paper's four first: a comparison cut
# short has them. A method without a global model (FedSA-LoRA: each client keeps its own B) is
# scored on its clients' own held-out data: the image-personal preset.
PAPER = ["RB-LoRA", "Weighted HETLoRA", "Uniform HETLoRA", "FLoRA"]
GLOBAL = [m for m in available_methods() if get_method(m).protocol.has_global_model]
OTHERS = [m for m in GLOBAL if m not in PAPER and m != "FedIT"]
HETEROGENEOUS = [f"{m}@heterogeneous" for m in PAPER + OTHERS]
SEED_RANKS = [4, 4, 16, 16, 64, 64, 128, 128, 256, 256]


def seed_ranks(clients: int) -> str:
    """The seed's ranks cycled over ``clients`` clients, as ``--client_ranks`` takes them."""
    return ",".join(str(SEED_RANKS[k % len(SEED_RANKS)]) for k in range(clients))


PRESETS = {
    "lm": {
        "prepare": ["10", "2", "--source", "mixture", "--tasks", "sst2,rte,mrpc,boolq",
                    "--per_task", "200", "--client_sizes", "16,16,24,24,32,32,40,40,48,48",
                    "--test_per_category", "150"],
        "train": ["--config", "embedded.yaml"],
        "methods": [*HETEROGENEOUS, "FedIT@smallest"],
        "seeds": "1,2,3",
        "settings": "heterogeneous;smallest",
    },
    "image": {
        "prepare": ["10", "--source", "fashion-mnist", "--partition", "dirichlet",
                    "--alpha", "0.5", "--pool_size", "1000", "--test_per_category", "50"],
        "train": ["--config", "vit_embedded.yaml",
                  "--image_size", "84"],
        "methods": [*HETEROGENEOUS, "FedIT@smallest", "head-only@heterogeneous"],
        "seeds": "1,2,3",
        "settings": "heterogeneous;smallest",
    },
}  # fmt: skip
# the image setting with about the same total rank (936) spread three ways: where do
# rank-balanced weights matter?
PRESETS["image-sweep"] = {
    **PRESETS["image"],
    "methods": ["RB-LoRA", "FlexLoRA", "Weighted HETLoRA"],
    "settings": ";".join(
        [
            "equal=" + ",".join(["94"] * 10),
            "heterogeneous",  # the seed's 4, 4, 16, 16, 64, 64, 128, 128, 256, 256
            "skewed=" + ",".join(["24"] * 7 + ["256"] * 3),
        ]
    ),
}

# personalised evaluation (docs/evaluation.md): the image setting with a fifth of each
# client's images held out as its own test split; every round also scores each client's model
# (what it starts its next round from: FedSA-LoRA's shared A with its own B) on that split.
# The methods whose clients hold different things: the stack and padded rules, the frozen A,
# the alternating and the residual ones, and FedSA-LoRA.
PRESETS["image-personal"] = {
    **PRESETS["image"],
    "prepare": [*PRESETS["image"]["prepare"], "--local_test_frac", "0.2"],
    "train": [*PRESETS["image"]["train"], "--eval_personalized"],
    "methods": ["RB-LoRA", "FlexLoRA", "Weighted HETLoRA", "FFA-LoRA", "RoLoRA", "FedEx-LoRA",
                "FedSA-LoRA"],
    "settings": "heterogeneous",
}  # fmt: skip

# client-level DP (docs/privacy.md): the image task with 50 clients, each taking
# part with probability 0.2 (Poisson sampling: the accountant's amplification holds), 5 rounds;
# RB-LoRA, FlexLoRA and Weighted HETLoRA at each privacy level, one comparison (and folder) per
# level, and the same without DP. C = 0.2 was the median term norm of round 1 without clipping
# (the usual DP-FedAvg choice, read off private norms: a choice the accountant does not count),
# the same at every level; "inf" clips with no noise.
PRIVACY_CLIP = "0.2"
PRIVACY_LEVELS = {
    "none": [],  # not private: the method's own weights over the round's clients, no clip
    "inf": ["--dp_clip", PRIVACY_CLIP, "--dp_noise_multiplier", "0"],
    "8": ["--dp_clip", PRIVACY_CLIP, "--dp_epsilon", "8", "--dp_delta", "1e-5"],
    "2": ["--dp_clip", PRIVACY_CLIP, "--dp_epsilon", "2", "--dp_delta", "1e-5"],
}
PRESETS["image-privacy"] = {
    "prepare": ["50", "--source", "fashion-mnist", "--partition", "dirichlet", "--alpha", "0.5",
                "--min_size", "20", "--pool_size", "2500", "--test_per_category", "50"],
    "train": ["--config", "vit_embedded.yaml", "--image_size", "84",
              "--num_clients", "50", "--client_selection_frac", "0.2",
              "--client_sampling", "poisson", "--num_communication_rounds", "5",
              "--client_ranks", seed_ranks(50)],
    "methods": ["RB-LoRA", "FlexLoRA", "Weighted HETLoRA"],
    "seeds": "1,2,3",
    "settings": "heterogeneous",
    "levels": PRIVACY_LEVELS,
}  # fmt: skip

# client-level DP at cross-device scale (docs/scale.md, docs/privacy.md): 10,000 Dirichlet-0.5
# clients of about 6 images (all 60,000 Fashion-MNIST training images; the smallest topped up to
# 3), each taking part with probability 0.1 (about 1,000 clients a round), the seed's ranks
# cycled; every private level clips adaptively (Andrew et al. 2021: the median of the clients'
# term norms, tracked privately), so no C is read off private norms; delta 1e-6 < 1/10,000.
# 10 rounds (a round trains about 6,000 images: 10 rounds are 10 passes over a tenth of the
# data each, where the 10-client image table's 3 rounds over all of it had levelled off) at
# 56 px (17 tokens an image, less than half of 84 px's 37): a round is about 2 minutes of one
# core (docs/scale.md measured 270 s at 84 px), so the 24 cells (2 seeds) take about 8 hours
# of one core; split them with --seeds / --methods / --levels over processes or sessions
# (cells resume).
LARGE_ROUNDS = "10"
LARGE_IMAGE_SIZE = "56"
LARGE_LEVELS = {
    "none": [],
    "inf": ["--dp_clip_quantile", "0.5", "--dp_noise_multiplier", "0"],
    "8": ["--dp_clip_quantile", "0.5", "--dp_epsilon", "8", "--dp_delta", "1e-6"],
    "2": ["--dp_clip_quantile", "0.5", "--dp_epsilon", "2", "--dp_delta", "1e-6"],
}
PRESETS["image-privacy-large"] = {
    "prepare": ["10000", "--source", "fashion-mnist", "--partition", "dirichlet", "--alpha", "0.5",
                "--test_per_category", "50"],
    "train": ["--config", "vit_embedded.yaml", "--image_size", LARGE_IMAGE_SIZE,
              "--num_clients", "10000", "--client_selection_frac", "0.1",
              "--client_sampling", "poisson", "--num_communication_rounds", LARGE_ROUNDS,
              "--client_ranks", seed_ranks(10000)],
    "methods": ["RB-LoRA", "FlexLoRA", "Weighted HETLoRA"],
    "seeds": "1,2",
    "settings": "heterogeneous",
    "levels": LARGE_LEVELS,
}  # fmt: skip

QUICK = {
    "lm": {
        "prepare": ["3", "2", "--source", "mixture", "--tasks", "sst2", "--client_sizes",
                    "4,4,8", "--test_per_category", "10"],
        "train": ["--num_clients", "3", "--client_ranks", "4,8,16",
                  "--num_communication_rounds", "1"],
        "methods": ["RB-LoRA", "FLoRA"],
        "seeds": "1",
        "settings": "heterogeneous",
    },
    "image": {
        "prepare": ["3", "--source", "fashion-mnist", "--partition", "iid", "--pool_size", "96",
                    "--test_per_category", "5"],
        "train": ["--num_clients", "3", "--client_ranks", "4,8,16",
                  "--num_communication_rounds", "1", "--image_size", "56"],
        "methods": ["RB-LoRA", "FLoRA", "head-only"],
        "seeds": "1",
        "settings": "heterogeneous",
    },
    "image-personal": {
        "prepare": ["3", "--source", "fashion-mnist", "--partition", "iid", "--pool_size", "96",
                    "--test_per_category", "5", "--local_test_frac", "0.25"],
        "train": ["--num_clients", "3", "--client_ranks", "4,8,16",
                  "--num_communication_rounds", "1", "--image_size", "56"],
        "methods": ["RB-LoRA", "FedSA-LoRA"],
        "seeds": "1",
        "settings": "heterogeneous",
    },
    "image-privacy": {
        "prepare": ["3", "--source", "fashion-mnist", "--partition", "iid", "--pool_size", "96",
                    "--test_per_category", "5"],
        "train": ["--num_clients", "3", "--client_ranks", "4,8,16", "--client_selection_frac",
                  "1", "--num_communication_rounds", "1", "--image_size", "56"],
        "methods": ["RB-LoRA"],
        "seeds": "1",
        "levels": {k: PRIVACY_LEVELS[k] for k in ("none", "inf", "8")},
    },
    "image-privacy-large": {  # 300 clients of 4 images, about 30 a round
        "prepare": ["300", "--source", "fashion-mnist", "--partition", "dirichlet", "--alpha",
                    "0.5", "--pool_size", "1200", "--test_per_category", "5"],
        "train": ["--num_clients", "300", "--num_communication_rounds", "1",
                  "--image_size", "28", "--client_ranks", seed_ranks(300)],
        "methods": ["RB-LoRA"],
        "seeds": "1",
        "levels": {k: LARGE_LEVELS[k] for k in ("none", "8")},
    },
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(PRESETS))
    parser.add_argument("--quick", action="store_true", help="a few minutes: 1 seed, 1 round")
    parser.add_argument("--output_dir", type=Path, help="default: ./outputs/bench_<task>[_quick]")
    parser.add_argument("--seeds", help="override the preset's seeds, e.g. 1,2")
    parser.add_argument(
        "--methods",
        help="override the preset's methods (rblora compare --methods), e.g. "
        '"FlexLoRA@heterogeneous,FedIT@smallest"; with --seeds, splits one comparison over '
        "processes that share its folder",
    )
    parser.add_argument(
        "--data_seeds",
        help="partition seeds as replicates too, e.g. 1,2 (rblora compare --data_seeds: one data "
        "folder per seed, prepared with the preset's options)",
    )
    parser.add_argument(
        "--levels",
        help="privacy presets only: run these of the preset's levels, in this order, e.g. none,8 "
        "(the table reads every level that has results)",
    )
    ns = parser.parse_args(argv)
    from rblora.data.prepare import main as prepare_main
    from rblora.experiments.compare import main as compare_main

    preset = dict(PRESETS[ns.task])
    if ns.quick:  # the full preset's options, smaller where QUICK says so
        quick = QUICK[ns.task]
        preset = {**preset, **{k: v for k, v in quick.items() if k != "train"}}
        preset["train"] = [*preset["train"], *quick["train"]]
    if ns.levels and "levels" not in preset:
        parser.error(f"--levels: the preset {ns.task} has no privacy levels")
    chosen = ns.levels.split(",") if ns.levels else list(preset.get("levels", {}))
    unknown = [name for name in chosen if name not in preset.get("levels", {})]
    if unknown:
        parser.error(f"--levels {ns.levels}: {unknown} not among {list(preset['levels'])}")
    out = ns.output_dir or ROOT / "outputs" / f"bench_{ns.task}{'_quick' if ns.quick else ''}"
    data = out / "data"
    clients = preset["prepare"][0]
    if not (data / clients / "partition.json").is_file():
        code = prepare_main([*preset["prepare"], "--output_dir", str(data)])
        if code:
            return code
    methods = ns.methods or ",".join(preset["methods"])
    argv = ["--methods", methods, "--seeds", ns.seeds or preset["seeds"]]
    if ns.data_seeds:
        argv += ["--data_seeds", ns.data_seeds]
    argv += ["--rank_settings", preset["settings"]]
    train = [*preset["train"], "--data_path", str(data), "--no_progress"]
    if "levels" in preset:  # one comparison per privacy level, on the same data
        for name in chosen:
            options = preset["levels"][name]
            level = ["--output_dir", str(out / f"epsilon_{name}"), "--", *train, *options]
            code = compare_main([*argv, *level])
            if code:
                return code
        print(privacy_utility(out, list(preset["levels"])))
        return 0
    code = compare_main([*argv, "--output_dir", str(out), "--", *train])
    if code == 0 and ns.task == "image-sweep":
        print(rank_sweep(out))
    return code


def privacy_utility(out: Path, levels: list[str], metric: str = "test/accuracy") -> str:
    """Top-1 after the last round at each privacy level (``<out>/epsilon_<level>``, each a
    comparison; ``none``: without DP): mean ± standard deviation over the seeds that finished
    and each seed's value; a cell that stopped (its ``failed.txt``: say, training diverged
    from a noised start) shows its last evaluated top-1 and the round it stopped in, and one
    not finished yet (still running, or killed) its top-1 so far, named so; neither is in the
    mean. Also ``<out>/plots/privacy_utility.png`` (unfinished cells left out)."""
    import matplotlib

    from rblora.experiments.compare import FAILED, cell_rounds
    from rblora.experiments.differences import cell_outcomes
    from rblora.utils.records import read_json

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [name for name in levels if (out / f"epsilon_{name}" / "compare.json").is_file()]
    spent: dict = {}  # level -> the epsilons its cells recorded by their last round
    found: dict = {}  # method -> level -> [(seed, value, None if finished or why not)]
    finished: dict = {}  # (method, level) -> {seed: last round's outcomes} of finished cells
    for level in levels:
        root = out / f"epsilon_{level}"
        index = read_json(root / "compare.json")
        for cell in index["cells"]:
            rounds = cell_rounds(root, cell, index["num_clients"]) or []
            scored = [r for r in rounds if r["round"] >= 1 and r.get(metric) is not None]
            if rounds and "dp_epsilon" in rounds[-1]:
                spent.setdefault(level, []).append(rounds[-1]["dp_epsilon"])
            if scored:
                last = scored[-1]["round"]
                stopped = None  # finished; else why not, as the table says it
                if last < index["rounds"] and (root / cell["path"] / FAILED).is_file():
                    stopped = f"stopped in r{last + 1}"
                elif last < index["rounds"]:
                    stopped = f"unfinished: r{last} of {index['rounds']}"
                found.setdefault(cell["method"], {}).setdefault(level, []).append(
                    (cell["seed"], scored[-1][metric], stopped)
                )
                run = root / cell["path"] / str(index["num_clients"])
                label = f"{level} / {cell['method']} / seed {cell['seed']}"
                outcomes = cell_outcomes(run, rounds, label) if stopped is None else {}
                if last in outcomes:
                    finished.setdefault((cell["method"], level), {})[cell["seed"]] = outcomes[last]
    columns = [_level_name(level, spent.get(level, [])) for level in levels]
    lines = ["| method | " + " | ".join(columns) + " |"]
    lines.append("|---|" + "---|" * len(levels))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, by_level in found.items():
        cells, xs, means, sds, stopped_at = [], [], [], [], []
        for i, level in enumerate(levels):
            runs = sorted(by_level.get(level, []))
            if not runs:
                cells.append("-")
                continue
            done = [v for _, v, stopped in runs if stopped is None]
            seeds = " / ".join(
                f"{v:.3f}" + (f" ({stopped})" if stopped else "") for _, v, stopped in runs
            )
            if done:
                mean, sd = _mean_sd(done)
                cells.append(f"{mean:.3f} ± {sd:.3f} ({seeds})")
                xs.append(i)
                means.append(mean)
                sds.append(sd)
            else:
                cells.append(seeds)
                ended = [v for _, v, why in runs if why.startswith("stopped")]
                if ended:
                    stopped_at.append((i, _mean_sd(ended)[0]))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
        drawn = ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=method)
        if stopped_at:  # no seed finished: where the stopped ones were when they stopped
            ax.scatter(*zip(*stopped_at, strict=True), marker="x", color=drawn[0].get_color())
    ax.set_xticks(range(len(levels)), columns)
    ax.set_ylabel(f"{metric} after the last round\n(x: every seed stopped; its last round)")
    _save_plot(fig, ax, out / "plots" / "privacy_utility.png")
    return "\n".join(lines + _privacy_costs(finished, levels, columns, metric))


def _level_name(level: str, recorded: list) -> str:
    """A privacy level named by the epsilon its runs recorded (the accountant's, for the
    sampling they did), not by the option that asked for it."""
    if level == "none":
        return "no DP"
    if not recorded or all(e is None for e in recorded):
        return "clip only (no noise)"
    return f"epsilon {max(e for e in recorded if e is not None):.3g}"  # a finished run's


def _privacy_costs(finished: dict, levels: list[str], columns: list[str], metric: str) -> list:
    """Rows of each method's paired difference, level minus no DP, over the seeds both
    finished, on the same test items (the seed's own run without DP is the pair)."""
    from rblora.experiments.paired import match_items, paired_difference

    if "none" not in levels:
        return []
    suite, measure = metric.split("/")
    lines = ["", "| method | level | minus no DP | 95% interval | reading |"]
    lines.append("|---|---|---|---|---|")
    for (method, level), runs in finished.items():
        reference = finished.get((method, "none"), {})
        seeds = sorted(set(runs) & set(reference))
        if level == "none" or not seeds:
            continue
        pairs = []
        for seed in seeds:
            x, y = runs[seed][suite], reference[seed][suite]
            pairs.append(match_items(x, y, measure, f"{method} seed {seed}"))
        result = paired_difference(pairs)
        reading = result.reading().replace("the reference", "no DP")
        lines.append(
            f"| {method} | {columns[levels.index(level)]} | {result.difference:+.3f} | "
            f"[{result.low:+.3f}, {result.high:+.3f}] | {reading} |"
        )
    return lines


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    import statistics

    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _save_plot(fig, ax, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def rank_sweep(out: Path, metric: str = "test/accuracy") -> str:
    """Top-1 after the last round against the spread of the client ranks (their standard
    deviation; the total rank is about the same in every setting): a table (mean ± standard
    deviation over seeds, and each seed) and ``<out>/plots/rank_sweep.png``."""
    import json
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = json.loads((out / "compare.json").read_text())
    found: dict = {}  # (method, setting) -> {seed: value}
    spread: dict = {}  # setting -> (std of ranks, sum of ranks)
    for cell in index["cells"]:
        results = out / cell["path"] / str(index["num_clients"]) / "results.json"
        if not results.is_file():
            continue
        final = json.loads(results.read_text())["final"]
        found.setdefault((cell["method"], cell["setting"]), {})[cell["seed"]] = final[metric]
        spread[cell["setting"]] = (statistics.pstdev(cell["ranks"]), sum(cell["ranks"]))
    settings = sorted(spread, key=lambda name: spread[name][0])
    methods = list(dict.fromkeys(method for method, _ in found))
    lines = [
        "| method | "
        + " | ".join(
            f"{name} (sum {spread[name][1]}, sd {spread[name][0]:.0f})" for name in settings
        )
        + " |"
    ]
    lines.append("|---|" + "---|" * len(settings))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        cells, xs, means, sds = [], [], [], []
        for name in settings:
            values = [v for _, v in sorted(found.get((method, name), {}).items())]
            if not values:
                cells.append("-")
                continue
            mean, sd = _mean_sd(values)
            seeds = " / ".join(f"{v:.3f}" for v in values)
            cells.append(f"{mean:.3f} ± {sd:.3f} ({seeds})")
            xs.append(spread[name][0])
            means.append(mean)
            sds.append(sd)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
        ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=method)
    ax.set_xlabel("standard deviation of the client ranks (total rank ~936)")
    ax.set_ylabel(f"{metric} after the last round")
    _save_plot(fig, ax, out / "plots" / "rank_sweep.png")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
