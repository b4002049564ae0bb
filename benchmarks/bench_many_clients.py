"""Does a client cost its own compute and little more? The same images (tokens) a round, spread
over 10, 100, 1,000 and 10,000 clients.

    .venv/bin/python benchmarks/bench_many_clients.py                  # images and LM, ~1 hour
    .venv/bin/python benchmarks/bench_many_clients.py --part image --images 6000 --clients 10,1000
    .venv/bin/python benchmarks/bench_many_clients.py --part lm --lm_clients 10,100
    .venv/bin/python benchmarks/bench_many_clients.py --part lm-gap    # where LM tokens/s go

**image**: ``--images`` Fashion-MNIST training images (a stratified pool, split IID by
``prepare-data``) over K clients for each K of ``--clients``; DINOv2 ViT-S/14 (embedded) at
``--image_size`` px with the vision job's options (the shipped ``vit_embedded.yaml``: its ranks
cycled over the clients, lr 1e-3, one epoch) but batch ``--batch`` (8: a client of 6 images
trains one batch of 6). **lm**: ``--lm_records`` records of the main job's mixture (SST-2,
RTE, MRPC, BoolQ in the papers' format, as ``make run`` prepares them) over K clients for each K
of ``--lm_clients``, on SmolLM2-135M-Instruct with the main job's options
(the shipped ``embedded.yaml``: its ranks cycled, batch 8, cutoff 256, prompt masked, length
grouping).

Each size is its own prepared data folder and its own task, built the way ``train.py`` builds
it (``rblora.tasks.build_task``: the clients' data opened lazily, bf16 decided once per
process), all tasks sharing one loaded model. A round is what the in-process engine does for
each client of a round: ``rounds.train_client`` (the task attaches the client's LoRA to the
resident model, trains it, reads the factors back and detaches it), ``rounds.client_update``,
``rounds.client_record`` and the client's metrics line (``RunFolder.append_metrics``, fsynced),
every client of the folder selected, each from a fresh LoRA. Not included: the server
(aggregation, evaluation, round folders; issue 25's item 3) and client adapter folders (the
engine's ``--save_client_adapters``).

All sizes run in one process, one after the other, ``--repeat`` times in alternating order
(10, 100, ..., then back); round 1 of a size also reads and resizes its clients' images, later
rounds find them kept (``ImageTask.pixel_cache_bytes``). Printed per round: wall seconds,
images (tokens) per second, the ratio to the first size's best round, the process's CPU seconds,
the training loops' own seconds (``train_local``) and the rest per client, and the 1-minute
load average before and after. The last table keeps each size's best round. Goal (issue 25):
ratio >= 0.85 at 1,000 clients.

**lm-gap**: the main job's clients train at fewer tokens/s than ``train_local`` on uniform
150-token batches. One process measures, on the same LoRA: uniform batches of 8 x 150 tokens;
the main job's 10 clients (``make run``'s data) through the task; the same clients' examples
through ``train_local`` on one attached LoRA (no per-client set-up); the clients through the task
again with ``TrainConfig.split_by_length``; and counts the padded positions of their
micro-batches, to say where the difference goes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAIN_JOB_TASKS = "sst2,rte,mrpc,boolq"
MAKE_RUN_SIZES = "16,16,24,24,32,32,40,40,48,48"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def load() -> float:
    return os.getloadavg()[0]


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, e.g. 10,100, got {text!r}")
    return values


# ---------------------------------------------------------------------- building the tasks
def prepare(root: Path, clients: int, argv: list[str]) -> Path:
    """``prepare-data <clients> ...`` into ``root`` (quietly); returns ``root``."""
    from rblora.data.prepare import main as prepare_main

    with contextlib.redirect_stdout(io.StringIO()):
        code = prepare_main([str(clients), *argv, "--output_dir", str(root)])
    if code:
        raise SystemExit(f"prepare-data {clients} {' '.join(argv)} failed (exit {code})")
    return root


def build(argv: list[str], models: dict):
    """The run's task as ``train.py`` builds it, without evaluation sets; and its args."""
    from rblora.federation.options import parse_args
    from rblora.tasks import build_task

    args, given = parse_args(argv)
    task = build_task(args, given, log=lambda _: None, evaluation=False, models=models)
    return task, args


def cycled(ranks: list[int], count: int) -> str:
    return ",".join(str(ranks[k % len(ranks)]) for k in range(count))


def image_cases(opts, root: Path, models: dict) -> list[dict]:
    cases = []
    for k in opts.clients:
        if k > opts.images:
            raise SystemExit(f"--clients {k} exceeds --images {opts.images}: a client needs one")
        data = prepare(root / "image", k, [
            "--source", opts.source, "--partition", "iid", "--pool_size", str(opts.images),
            "--test_per_category", "1", "--overwrite",
        ])  # fmt: skip
        argv = [
            "--config", "vit_embedded.yaml",
            "--data_path", str(data), "--num_clients", str(k),
            "--client_ranks", cycled(opts.ranks, k), "--image_size", str(opts.image_size),
            "--local_batch_size", str(opts.batch), "--local_micro_batch_size", str(opts.batch),
            "--output_dir", str(root / "runs"), "--no_progress", "--seed", "0",
        ]  # fmt: skip
        if opts.model:
            argv += ["--global_model", opts.model]
        task, args = build(argv, models)
        cases.append({"clients": k, "task": task, "args": args, "unit": "images"})
    return cases


def lm_data_argv(opts) -> list[str]:
    if opts.lm_dolly:
        return ["--source", "files", "--dolly", opts.lm_dolly, "--test_per_category", "1"]
    return ["--source", "mixture", "--tasks", MAIN_JOB_TASKS, "--per_task", "200",
            "--test_per_category", "50"]  # fmt: skip


def lm_argv(opts, data: Path, k: int, ranks: list[int]) -> list[str]:
    argv = [
        "--config", "embedded.yaml", "--data_path", str(data),
        "--num_clients", str(k), "--client_ranks", cycled(ranks, k),
        "--output_dir", str(opts.workdir / "runs"), "--no_progress", "--seed", "0",
    ]  # fmt: skip
    if opts.lm_model:
        argv += ["--global_model", opts.lm_model]
    return argv


def lm_cases(opts, root: Path, models: dict) -> list[dict]:
    cases = []
    for k in opts.lm_clients:
        if k > opts.lm_records:
            raise SystemExit(f"--lm_clients {k} exceeds --lm_records {opts.lm_records}")
        data = prepare(root / "lm", k, [
            *lm_data_argv(opts), "--partition", "iid", "--pool_size", str(opts.lm_records),
            "--overwrite",
        ])  # fmt: skip
        task, args = build(lm_argv(opts, data, k, opts.lm_ranks), models)
        cases.append({"clients": k, "task": task, "args": args, "unit": "tokens"})
    return cases


# ---------------------------------------------------------------------- one round
def run_round(case: dict, folder, round_: int) -> dict:
    """Every client of the case's folder, as the in-process engine trains a round's clients;
    returns the round's figures."""
    from rblora.federation import rounds
    from rblora.federation.server import derive_seed
    from rblora.protocol.types import ClientSpec, ClientStart

    task, args = case["task"], case["args"]
    ranks = args.ranks()
    specs = [
        ClientSpec(k, ranks[k], args.lora_alpha, args.use_rslora, task.num_examples(k))
        for k in range(args.num_clients)
    ]
    before = load()
    units = loop_seconds = 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    for spec in specs:
        start = ClientStart(None, {})
        seed = derive_seed(args.seed, round_, spec.client_id)
        result = rounds.train_client(task, spec, start, seed=seed, round_=round_)
        update = rounds.client_update(spec, result)
        record = rounds.client_record(round_, spec, result, start, rounds.upload_bytes(update))
        folder.append_metrics(record)
        units += result.metrics["images" if case["unit"] == "images" else "tokens"]
        loop_seconds += result.metrics["seconds"]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "clients": args.num_clients, "round": round_, "units": int(units), "seconds": wall,
        "per_second": units / wall, "cpu_seconds": cpu, "loop_seconds": loop_seconds,
        "rest_ms_per_client": 1000 * (wall - loop_seconds) / args.num_clients,
        "load_before": before, "load_after": load(),
    }  # fmt: skip


def measure(cases: list[dict], repeat: int, workdir: Path) -> list[dict]:
    from rblora.federation.rundir import RunFolder

    rows = []
    for rep in range(repeat):
        order = cases if rep % 2 == 0 else cases[::-1]
        for case in order:
            path = workdir / "records" / f"{case['unit']}-{case['clients']}-{rep}"
            path.mkdir(parents=True, exist_ok=True)
            row = run_round(case, RunFolder(path), rep + 1)
            rows.append(row)
            print(json.dumps({"part": case["unit"], **row}), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], unit: str) -> str:
    """Every round, then each size's best round, with the ratio to the first size's best."""
    best: dict[int, dict] = {}
    for r in rows:
        if r["clients"] not in best or r["per_second"] > best[r["clients"]]["per_second"]:
            best[r["clients"]] = r
    sizes = sorted(best)
    reference = best[sizes[0]]["per_second"]
    head = (
        f"| clients | round | {unit} | seconds | {unit}/s | ratio to {sizes[0]} | CPU s | "
        f"loop s | rest ms/client | load before/after |"
    )
    lines = [head, "|" + "---|" * 10]

    def line(r: dict) -> str:
        return (
            f"| {r['clients']} | {r['round']} | {r['units']} | {r['seconds']:.1f} | "
            f"{r['per_second']:.1f} | {r['per_second'] / reference:.3f} | "
            f"{r['cpu_seconds']:.1f} | {r['loop_seconds']:.1f} | "
            f"{r['rest_ms_per_client']:.1f} | {r['load_before']:.2f}/{r['load_after']:.2f} |"
        )

    lines += [line(r) for r in sorted(rows, key=lambda r: (r["clients"], r["round"]))]
    lines += ["", f"best round of each size ({unit}/s, ratio to {sizes[0]} clients):", ""]
    lines += [head, "|" + "---|" * 10] + [line(best[k]) for k in sizes]
    return "\n".join(lines)


# ---------------------------------------------------------------------- lm-gap
def lm_gap(opts, root: Path, models: dict) -> str:
    """Uniform 150-token batches against the main job's clients (module doc)."""
    from dataclasses import replace

    import torch

    from rblora.adapters import LoraHost, LoraSpec
    from rblora.federation import rounds
    from rblora.federation.server import derive_seed
    from rblora.protocol.types import ClientSpec, ClientStart
    from rblora.training import train_local
    from rblora.training.batching import epoch_order, split_by_length

    sizes = opts.gap_sizes
    data = prepare(root / "gap", len(sizes), [
        *lm_data_argv(opts), "--partition", "sizes", "--client_sizes",
        ",".join(map(str, sizes)), "--overwrite",
    ])  # fmt: skip
    main_ranks = [4, 4, 8, 8, 16, 16, 32, 32, 64, 64]
    task, args = build(lm_argv(opts, data, len(sizes), main_ranks), models)
    config, ranks = task.train_config, args.ranks()
    clients = [task._train[k] for k in range(len(sizes))]
    real = sum(len(e["input_ids"]) for c in clients for e in c)
    padded = split_padded = passes = 0
    for k, examples in enumerate(clients):
        g = torch.Generator().manual_seed(derive_seed(args.seed, 1, k))
        lengths = [len(e["input_ids"]) for e in examples]
        for mb in epoch_order(lengths, len(lengths), config.micro_batch_size, True, g):
            padded += len(mb) * max(lengths[j] for j in mb)
            for part in split_by_length(mb, lengths, opts.split_call_cost):
                split_padded += len(part) * max(lengths[j] for j in part)
                passes += 1
    # uniform: the clients' tokens cut into 150-token pieces, trained on every token
    stream = [t for c in clients for e in c for t in e["input_ids"]]
    uniform = [
        {"input_ids": stream[s : s + 150], "labels": stream[s : s + 150]}
        for s in range(0, len(stream) - 149, 150)
    ][: max(8, real // 150)]
    host = LoraHost.of(task.model)
    loss_fn = task._loss_fn
    results = {}

    def one_lora(examples_list, rank: int) -> tuple[float, int]:
        peft = host.attach(LoraSpec(rank, 16.0, list(task.target_modules), 0.05), seed=0)
        try:
            seconds = tokens = 0
            for examples in examples_list:
                res = train_local(peft, examples, config, loss_fn=loss_fn,
                                  length=lambda e: len(e["input_ids"]))  # fmt: skip
                seconds += res.seconds
                tokens += res.tokens
            return seconds, tokens
        finally:
            host.detach()

    def through_task(rep: int, name: str) -> None:
        wall, tokens, loop = time.perf_counter(), 0, 0.0
        for k in range(len(sizes)):
            spec = ClientSpec(k, ranks[k], args.lora_alpha, args.use_rslora, len(clients[k]))
            seed = derive_seed(args.seed, rep + 1, k)
            res = rounds.train_client(task, spec, ClientStart(None, {}), seed=seed, round_=1)
            tokens += res.metrics["tokens"]
            loop += res.metrics["seconds"]
        wall = time.perf_counter() - wall
        results.setdefault(f"clients through the task{name}", []).append((tokens / wall, load()))
        results.setdefault(f"clients through the task{name}, loops only", []).append(
            (tokens / loop, load())
        )

    split = replace(config, split_by_length=True, split_call_cost=opts.split_call_cost)
    for rep in range(opts.repeat):
        s, t = one_lora([uniform], 16)
        results.setdefault("uniform", []).append((t / s, load()))
        s, t = one_lora(clients, 16)
        results.setdefault("clients, one LoRA", []).append((t / s, load()))
        task.train_config = config
        through_task(rep, "")
        task.train_config = split
        through_task(rep, ", split by length")
    task.train_config = config
    lines = [
        f"main job clients: {len(sizes)} of {sizes} records, {real} tokens in "
        f"{padded} padded positions of their micro-batches ({real / padded:.0%} real); split "
        f"by length (call cost {opts.split_call_cost}): {split_padded} in {passes} passes "
        f"({real / split_padded:.0%} real)",
        f"uniform: {len(uniform)} examples of 150 tokens, every token a target",
        "",
        "| case | tokens/s (each repeat, load) |",
        "|---|---|",
    ]
    for name, values in results.items():
        shown = ", ".join(f"{v:.0f} ({ld:.2f})" for v, ld in values)
        lines.append(f"| {name} | {shown} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["image", "lm", "both", "lm-gap"], default="both")
    p.add_argument("--clients", type=_ints, default=[10, 100, 1000, 10000],
                   help="image: client counts (the first is the reference)")  # fmt: skip
    p.add_argument("--images", type=int, default=10000, help="image: trained images a round")
    p.add_argument("--image_size", type=int, default=84)
    p.add_argument("--batch", type=int, default=8, help="image: local (micro) batch size")
    p.add_argument("--ranks", type=_ints, default=[4, 4, 16, 16, 64, 64, 128, 128, 256, 256],
                   help="image: ranks cycled over the clients (the vision job's)")  # fmt: skip
    p.add_argument("--source", default="fashion-mnist", help="image: fashion-mnist | digits")
    p.add_argument("--model", help="image model (default: the vision job's, dinov2-vits14)")
    p.add_argument("--lm_clients", type=_ints, default=[10, 100])
    p.add_argument("--lm_records", type=int, default=400, help="lm: records a round")
    p.add_argument("--lm_ranks", type=_ints, default=[4, 4, 8, 8, 16, 16, 32, 32, 64, 64])
    p.add_argument("--lm_model", help="language model (default: the main job's, SmolLM2)")
    p.add_argument("--lm_dolly", help="lm: a Dolly-format file instead of the main job's mixture")
    p.add_argument("--gap_sizes", type=_ints, default=_ints(MAKE_RUN_SIZES),
                   help="lm-gap: the clients' record counts (make run's)")  # fmt: skip
    p.add_argument("--split_call_cost", type=int, default=64,
                   help="lm-gap: TrainConfig.split_call_cost of the split case")  # fmt: skip
    p.add_argument("--repeat", type=int, default=2, help="rounds of each size")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--workdir", type=Path, help="data and records (default: a temporary folder)")
    p.add_argument("--out", type=Path, help="also write every round's figures here (JSON)")
    opts = p.parse_args(argv)
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    with contextlib.ExitStack() as stack:
        if opts.workdir is None:
            opts.workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        print(
            f"CPU: {cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; load average now {load():.2f}",
            flush=True,
        )
        models: dict = {}
        figures: dict[str, list[dict]] = {}
        if opts.part == "lm-gap":
            print(lm_gap(opts, opts.workdir, models))
            return 0
        parts = ["image", "lm"] if opts.part == "both" else [opts.part]
        for part in parts:
            cases = (image_cases if part == "image" else lm_cases)(opts, opts.workdir, models)
            bf16 = cases[0]["task"].train_config.bf16
            first = cases[0]["task"]  # one client untimed: the model's first steps warm up
            from rblora.federation import rounds
            from rblora.protocol.types import ClientSpec, ClientStart

            spec = ClientSpec(0, cases[0]["args"].ranks()[0], 16.0, False, first.num_examples(0))
            rounds.train_client(first, spec, ClientStart(None, {}), seed=1, round_=1)
            rows = measure(cases, opts.repeat, opts.workdir)
            unit = cases[0]["unit"]
            print(f"\n## {part}: bf16 {bf16}\n\n{table(rows, unit)}\n", flush=True)
            figures[part] = rows
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS {peak:.0f} MiB; load average now {load():.2f}")
        if opts.out:
            opts.out.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
