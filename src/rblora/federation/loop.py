"""The in-process round loop: select, train locally, aggregate, evaluate, save, redistribute.

Written once for every task (see :class:`rblora.federation.task.Task`). Output under ``run_dir``::

    round_<t>/global/          PEFT folder of the global update (scale 1, exact)
    round_<t>/client_<k>/      PEFT folder of client k's trained adapter (its rank and alpha)
    metrics.jsonl              one line per client per round, one per round
    checkpoint/                server state after the last completed round (resume)

Each round is repeatable: selection and every client's seed derive from the run seed, the round
and the client id, so a run resumed from a checkpoint ends with the same adapters.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rblora.adapters.spec import Factors, factor_bytes
from rblora.aggregation import ClientUpdate
from rblora.federation.server import FederatedServer, derive_seed
from rblora.federation.task import Task
from rblora.utils.atomic import atomic_dir, recover, write_text

CHECKPOINT = "checkpoint"


@dataclass
class LoopOptions:
    num_rounds: int
    seed: int
    save_client_adapters: bool = True
    progress: bool = True
    eval_base: bool = False  # evaluate the untouched base model first, recorded as round 0


def log(message: str) -> None:
    """One concise line on stderr (progress bars share it)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


# ---------------------------------------------------------------------- export
def exact_factors(delta: Factors) -> Factors:
    """The same update with every module at rank <= min(d_out, d_in), padded to one rank.

    A factored update of rank k > min(d_out, d_in) is rewritten exactly as (I, dW) or (dW, I);
    modules of lower rank get zero rows/columns so that one PEFT ``r`` serves all (zeros add
    nothing to B @ A).
    """
    compact: Factors = {}
    for module, (a, b) in delta.items():
        d_out, d_in = b.shape[0], a.shape[1]
        if a.shape[0] > min(d_out, d_in):
            dense = b.float() @ a.float()
            if d_in <= d_out:
                a, b = torch.eye(d_in, dtype=dense.dtype), dense
            else:
                a, b = dense, torch.eye(d_out, dtype=dense.dtype)
        compact[module] = (a, b)
    rank = max(a.shape[0] for a, _ in compact.values())
    padded: Factors = {}
    for module, (a, b) in compact.items():
        k = a.shape[0]
        if k < rank:
            a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        padded[module] = (a.float().contiguous(), b.float().contiguous())
    return padded


# ---------------------------------------------------------------------- checkpoint
def save_checkpoint(run_dir: Path, server: FederatedServer, extra: dict[str, Any]) -> None:
    tensors, meta = server.state_tensors()
    with atomic_dir(run_dir / CHECKPOINT) as tmp:
        if tensors:
            save_file(tensors, str(tmp / "server.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**meta, **extra}, indent=2) + "\n")


def load_checkpoint(run_dir: Path, server: FederatedServer) -> dict[str, Any] | None:
    """Restore the server from ``run_dir/checkpoint``; returns its metadata, or None if absent."""
    folder = run_dir / CHECKPOINT
    recover(folder)  # a run killed while replacing its checkpoint: the old one is put back
    if not (folder / "state.json").is_file():
        return None
    meta = json.loads((folder / "state.json").read_text())
    tensors_path = folder / "server.safetensors"
    tensors = load_file(str(tensors_path)) if tensors_path.is_file() else {}
    server.load_state_tensors(tensors, meta)
    return meta


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it belongs to an unfinished round
    return records


def truncate_metrics(run_dir: Path, completed_rounds: int) -> None:
    """Drop metric lines of rounds after ``completed_rounds`` (an interrupted round)."""
    kept = [r for r in read_metrics(run_dir) if r.get("round", 0) <= completed_rounds]
    write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))


class MetricsWriter:
    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()


# ---------------------------------------------------------------------- the loop
def run_rounds(
    task: Task,
    server: FederatedServer,
    run_dir: Path,
    options: LoopOptions,
    *,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run rounds ``server.completed_rounds + 1 .. options.num_rounds``; returns round records.

    The caller restores ``server`` (and the task's base, via :meth:`Task.merge_into_base` of
    ``server.merged``) from a checkpoint before calling this to resume.
    """
    from tqdm import tqdm

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsWriter(run_dir / "metrics.jsonl")
    rounds_done: list[dict[str, Any]] = []
    first = server.completed_rounds + 1
    if (
        options.eval_base
        and first == 1
        and not any(r.get("type") == "round" and r.get("round") == 0 for r in read_metrics(run_dir))
    ):
        start = time.perf_counter()
        record = {"type": "round", "round": 0, "selected": [], "eval": task.evaluate({}, round_=0)}
        record["eval_seconds"] = record["round_seconds"] = round(time.perf_counter() - start, 3)
        metrics.write(record)
        rounds_done.append(record)
        log(_round_line(record).replace("round 0 done", "base model evaluated"))
    round_bar = tqdm(
        range(first, options.num_rounds + 1),
        desc="rounds",
        initial=first - 1,
        total=options.num_rounds,
        disable=not options.progress,
        file=sys.stderr,
        position=0,
    )
    for t in round_bar:
        round_start = time.perf_counter()
        selected = server.select(t)
        round_dir = run_dir / f"round_{t}"
        updates: list[ClientUpdate] = []
        client_records = []
        for k in tqdm(
            selected,
            desc=f"round {t} clients",
            leave=False,
            disable=not options.progress,
            file=sys.stderr,
            position=1,
        ):
            spec = server.clients[k]
            start = server.start_for(k)
            bytes_down = server.download_bytes(k)
            result = task.train_client(spec, start, seed=derive_seed(options.seed, t, k), round_=t)
            updates.append(
                ClientUpdate(
                    num_examples=result.num_examples,
                    lora_alpha=spec.lora_alpha,
                    factors=result.factors,
                    use_rslora=spec.use_rslora,
                    client_id=k,
                )
            )
            if options.save_client_adapters:
                task.save_adapter(
                    round_dir / f"client_{k}",
                    result.factors,
                    rank=spec.rank,
                    lora_alpha=spec.lora_alpha,
                    use_rslora=spec.use_rslora,
                )
            record = {
                "type": "client",
                "round": t,
                "client": k,
                "rank": spec.rank,
                "num_examples": result.num_examples,
                **result.metrics,
                "bytes_down": bytes_down,
                "bytes_up": factor_bytes(result.factors),
            }
            metrics.write(record)
            client_records.append(record)
            log(_client_line(record))

        agg_start = time.perf_counter()
        global_update = server.aggregate(updates)
        delta = {m: global_update.factors(m) for m in global_update.modules}
        export = exact_factors(delta)
        server.redistribute(global_update)
        agg_seconds = time.perf_counter() - agg_start
        rank = next(iter(export.values()))[0].shape[0]
        task.save_adapter(
            round_dir / "global", export, rank=rank, lora_alpha=float(rank), use_rslora=False
        )

        eval_start = time.perf_counter()
        evaluation = task.evaluate(delta, round_=t)
        eval_seconds = time.perf_counter() - eval_start
        if global_update.merges_into_base:
            task.merge_into_base(delta)

        record = {
            "type": "round",
            "round": t,
            "selected": selected,
            "method": global_update.method,
            "reduction": global_update.reduction,
            "train_loss": _weighted_loss(client_records),
            "bytes_up": sum(r["bytes_up"] for r in client_records),
            "bytes_down": sum(r["bytes_down"] for r in client_records),
            "aggregate_seconds": round(agg_seconds, 3),
            "eval_seconds": round(eval_seconds, 3),
            "round_seconds": round(time.perf_counter() - round_start, 3),
            "eval": evaluation,
        }
        # metrics first: a kill between the two leaves a checkpoint of round t-1, and resuming
        # drops round t's lines and redoes it
        metrics.write(record)
        save_checkpoint(run_dir, server, {"round_record": record})
        rounds_done.append(record)
        log(_round_line(record))
        if on_round is not None:
            on_round(record)
    return rounds_done


def _weighted_loss(client_records: list[dict[str, Any]]) -> float | None:
    pairs = [(r["loss"], r["num_examples"]) for r in client_records if r.get("loss") is not None]
    if not pairs:
        return None
    return sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _client_line(r: dict[str, Any]) -> str:
    loss = f"{r['loss']:.4f}" if r.get("loss") is not None else "-"
    return (
        f"round {r['round']} client {r['client']} rank {r['rank']}: loss {loss}, "
        f"{r.get('steps', 0)} steps, {r.get('tokens', 0)} tokens, {r.get('seconds', 0):.1f}s, "
        f"up {_fmt_bytes(r['bytes_up'])}, down {_fmt_bytes(r['bytes_down'])}"
    )


def _round_line(r: dict[str, Any]) -> str:
    from rblora.federation.report import scalar_evals

    parts = [f"round {r['round']} done in {r['round_seconds']:.0f}s"]
    if r.get("train_loss") is not None:
        parts.append(f"train loss {r['train_loss']:.4f}")
    for name, value in scalar_evals(r.get("eval")).items():
        if name.endswith(("/accuracy", "/loss")):
            parts.append(f"{name} {value:.4f}")
    return ", ".join(parts)
