"""The paper's configuration rehearsed on this machine: Llama-3.1-8B's shapes, a bf16 base, a round.

    .venv/bin/python benchmarks/bench_paper_scale.py            # 1 and 2 layers, RB-LoRA and FLoRA
    .venv/bin/python benchmarks/bench_paper_scale.py --quick    # tiny shapes (what the tests run)

No GPU and no Llama weights are at hand, so the model is Llama-3.1-8B's architecture built from
its configuration (hidden 4096, 32 heads, 8 key/value heads, MLP 14336, the vocabulary at its
full 128,256) with random weights and 1, then 2, of its 32 layers, stored in bf16
(``--base_dtype bfloat16``). The run is ``configs/rb_lora.yaml`` / ``configs/flora.yaml`` (ranks
4, 4, 16, 16, 64, 64, 128, 128, 256, 256 on q_proj and v_proj, alpha 16, 10 clients) for
two rounds, on a few short records per client (SST-2 sentences of the embedded mixture,
tokenised with SmolLM2's tokenizer, whose ids all lie in Llama's vocabulary). Each figure is
measured in its own process:

- the run in-process (``train.py``, two rounds: round 2 is the first whose clients download a
  start): wall-clock of the whole command, and of round 2 its aggregation seconds, bytes up and
  down, the checkpoint, the global folder and the largest client's folder on disk;
- the server alone: the base model for evaluation (test set only, no client data), the ten
  clients' trained adapters of round 1 aggregated, redistributed, exported, checkpointed and the
  global model evaluated: its peak resident memory;
- one client alone (rank 256, its own records only), one round of local training: its peak
  resident memory.

Extrapolation to 32 layers: sizes, bytes and aggregation seconds belong to the LoRA modules
alone, so they are proportional to the layers (the 2-layer figure times 16; the 1-layer figure
checks it: sizes and bytes halve exactly). Memory and the whole command's seconds have a fixed
part (embeddings, the LM head, the framework): ``fixed + layers x per_layer``, both solved from
the two runs. Then to the paper's 50 rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}  # fmt: skip
QUICK = {**LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 49152}  # fmt: skip
PAPER_RANKS = [4, 4, 16, 16, 64, 64, 128, 128, 256, 256]
QUICK_RANKS = [1, 1, 2, 2, 4, 4, 8, 8, 16, 16]
PAPER_LAYERS, PAPER_ROUNDS = 32, 50
CONFIGS = {"RB-LoRA": "rb_lora.yaml", "FLoRA": "flora.yaml"}  # shipped configs, by name
RECORDS = 4  # per client


def build_model(folder: Path, shapes: dict, layers: int) -> None:
    """A LlamaForCausalLM of ``layers`` layers with ``shapes``, random weights (seeded), saved in
    bf16 with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rblora.assets import fetch

    tokenizer_dir = fetch("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        **shapes, num_hidden_layers=layers, bos_token_id=tokenizer.bos_token_id or 1,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialised in bf16: half the memory
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def prepare_data(folder: Path) -> None:
    from rblora.data.prepare import main as prepare_main

    sizes = ",".join([str(RECORDS)] * 10)
    argv = ["10", "2", "--source", "mixture", "--tasks", "sst2", "--per_task", "80",
            "--client_sizes", sizes, "--test_per_category", "8",
            "--output_dir", str(folder)]  # fmt: skip
    if prepare_main(argv) != 0:
        raise SystemExit("preparing the data failed")


def train_options(method: str, model: Path, data: Path, out: Path, ranks: list[int]) -> list[str]:
    sizes = json.dumps({f"client_{k}": RECORDS for k in range(10)})
    rank_dict = json.dumps({f"client_{k}": r for k, r in enumerate(ranks)})
    return [
        "--config", CONFIGS[method], "--global_model", str(model),
        "--data_path", str(data), "--output_dir", str(out), "--num_communication_rounds", "2",
        "--local_batch_size", str(RECORDS), "--local_micro_batch_size", str(RECORDS),
        "--cutoff_len", "256", "--client_dataset_size_dict", sizes,
        "--client_lora_rank_dict", rank_dict, "--dev_data_path", "", "--eval_mmlu_size", "0",
        "--base_dtype", "bfloat16", "--bf16", "false", "--no_progress", "--overwrite",
    ]  # fmt: skip


# ---------------------------------------------------------------------- measured in a child
def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child_train(argv: list[str]) -> dict:
    from rblora.federation import cli

    start = time.perf_counter()
    code = cli.main(argv)
    return {"code": code, "seconds": time.perf_counter() - start, "peak_rss": _peak_rss()}


def child_server(argv: list[str], run: str) -> dict:
    """The server's side of the round the in-process run made: its task (model + test set),
    the clients' trained adapters aggregated, redistributed, exported, checkpointed, evaluated."""
    from rblora.adapters import load_peft_adapter
    from rblora.aggregation import ClientUpdate
    from rblora.federation import rounds
    from rblora.federation.options import parse_args
    from rblora.federation.rundir import RunFolder
    from rblora.federation.server import FederatedServer
    from rblora.protocol.types import ClientSpec
    from rblora.tasks import build_task

    args, given = parse_args(argv)
    task = build_task(args, given, log=lambda _: None, clients=[])
    config = json.loads((Path(run) / "config.json").read_text())
    specs = [
        ClientSpec(k, r, args.lora_alpha, num_examples=n)
        for k, (r, n) in enumerate(zip(args.ranks(), config["client_sizes"], strict=True))
    ]
    updates = []
    for spec in specs:
        factors, _ = load_peft_adapter(Path(run) / "round_1" / f"client_{spec.client_id}")
        updates.append(ClientUpdate(spec.num_examples, spec.lora_alpha, factors))
    server = FederatedServer(args.method, specs, reduction=args.reduction_method)
    start = time.perf_counter()
    model = server.redistribute(server.aggregate(updates))
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        model = rounds.handed_out(model)
        rounds.export_global(task, Path(tmp) / "global", model)
        RunFolder(tmp).save_checkpoint(*server.state_tensors())
    rounds.evaluate_global(task, model, 1)
    return {"aggregate_seconds": seconds, "peak_rss": _peak_rss()}


def child_client(argv: list[str], client: int) -> dict:
    """One client alone: its own records, one round of local training at its rank."""
    from rblora.federation.options import parse_args
    from rblora.protocol.types import ClientSpec, ClientStart
    from rblora.tasks import build_task

    args, given = parse_args(argv)
    task = build_task(args, given, log=lambda _: None, clients=[client], evaluation=False)
    spec = ClientSpec(client, args.ranks()[client], args.lora_alpha, args.use_rslora)
    start = time.perf_counter()
    result = task.train_client(spec, ClientStart(None), seed=1, round_=1)
    return {"train_seconds": time.perf_counter() - start, "steps": result.metrics.get("steps"),
            "peak_rss": _peak_rss()}  # fmt: skip


def run_child(kind: str, *payload) -> dict:
    """``child_<kind>(*payload)`` in a fresh interpreter (its own peak memory)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        code = (
            "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_paper_scale as b; "
            f"r = b.child_{kind}(*json.loads(sys.argv[2])); json.dump(r, open(sys.argv[3], 'w'))"
        )
        argv = [sys.executable, "-c", code, str(Path(__file__).parent), json.dumps(payload),
                out.name]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ))
        if done.returncode != 0:
            raise SystemExit(f"{kind} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


# ---------------------------------------------------------------------- the table
def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(method: str, layers: int, work: Path, shapes: dict, ranks: list[int]) -> dict:
    model = work / f"model-{layers}"
    if not (model / "config.json").is_file():
        build_model(model, shapes, layers)
    out = work / f"out-{method}-{layers}"
    argv = train_options(method, model, work / "data", out, ranks)
    trained = run_child("train", argv)
    if trained["code"] != 0:
        raise SystemExit(f"train.py exited {trained['code']} ({method}, {layers} layers)")
    run = out / "10"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    round_2 = next(r for r in records if r.get("type") == "round" and r["round"] == 2)
    server = run_child("server", argv, str(run))
    largest = max(range(10), key=lambda k: ranks[k])
    client = run_child("client", argv, largest)
    return {
        "train.py seconds (2 rounds, 10 clients)": trained["seconds"],
        "peak RSS in-process (GB)": trained["peak_rss"] / 1e9,
        "peak RSS server (GB)": server["peak_rss"] / 1e9,
        f"peak RSS one client, rank {ranks[largest]} (GB)": client["peak_rss"] / 1e9,
        "aggregation seconds a round": round_2["aggregate_seconds"],
        "MB up a round (all clients)": round_2["bytes_up"] / 2**20,
        "MB down a round (all clients)": round_2["bytes_down"] / 2**20,
        "checkpoint MB (after round 2)": folder_bytes(run / "checkpoint") / 2**20,
        "global folder MB (round 2)": folder_bytes(run / "round_2" / "global") / 2**20,
        f"client folder MB (rank {ranks[largest]})": folder_bytes(
            run / "round_2" / f"client_{largest}"
        )
        / 2**20,
    }


PROPORTIONAL = ("aggregation seconds", "MB up", "MB down", "checkpoint MB", "folder MB")


def extrapolate(one: dict, two: dict, layers: int) -> dict:
    """Each quantity at ``layers`` layers from the 1- and 2-layer measurements: proportional to
    the layers for what only the LoRA modules make (``PROPORTIONAL``), else ``fixed + layers x
    per_layer``."""
    out = {}
    for key in one:
        if any(word in key for word in PROPORTIONAL):
            out[key] = two[key] / 2 * layers
        else:
            per_layer = two[key] - one[key]
            out[key] = (one[key] - per_layer) + layers * per_layer
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (the tests run this)")
    parser.add_argument("--methods", default="RB-LoRA,FLoRA")
    parser.add_argument("--workdir", help="keep models, data and runs here (default: temporary)")
    parser.add_argument("--out", help="also write the figures as JSON to this file")
    ns = parser.parse_args(argv)
    shapes, ranks = (QUICK, QUICK_RANKS) if ns.quick else (LLAMA, PAPER_RANKS)
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="rblora-paper-") as tmp:
        work = Path(ns.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "data" / "10").is_dir():
            prepare_data(work / "data")
        results = {}
        for method in methods:
            measured = {layers: measure(method, layers, work, shapes, ranks) for layers in (1, 2)}
            results[method] = {
                "1 layer": measured[1], "2 layers": measured[2],
                f"{PAPER_LAYERS} layers (extrapolated)": extrapolate(
                    measured[1], measured[2], PAPER_LAYERS
                ),
            }  # fmt: skip
            print_table(method, results[method])
        if ns.out:
            Path(ns.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def print_table(method: str, figures: dict) -> None:
    columns = list(figures)
    print(f"\n{method}: " + ", ".join(columns))
    print("| quantity | " + " | ".join(columns) + f" | x {PAPER_ROUNDS} rounds |")
    print("|---|" + "---|" * (len(columns) + 1))
    full = figures[columns[-1]]
    per_round = {"aggregation seconds a round", "MB up a round (all clients)",
                 "MB down a round (all clients)"}  # fmt: skip
    for key in figures[columns[0]]:
        cells = [f"{figures[c][key]:.2f}" for c in columns]
        total = f"{full[key] * PAPER_ROUNDS:.0f}" if key in per_round else "-"
        print(f"| {key} | " + " | ".join(cells) + f" | {total} |")


if __name__ == "__main__":
    sys.exit(main())
