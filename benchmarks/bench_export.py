"""Bytes on disk of the round folders of the paper's configuration (Llama-3.1-8B, seed's ranks).

    .venv/bin/python benchmarks/bench_export.py            # one real-shape layer, about a minute
    .venv/bin/python benchmarks/bench_export.py --quick    # small shapes, seconds (smoke test)

One layer of Llama-3.1-8B's adapted modules (``q_proj`` 4096 x 4096, ``v_proj`` 1024 x 4096) with
ten clients of ranks [4, 4, 16, 16, 64, 64, 128, 128, 256, 256], lora_alpha 16, random factors
(``bench_aggregation.make_clients``, a new draw each round). The server aggregates and
redistributes as a run does (``FederatedServer``), and ``rounds.export_global`` writes the
global folder with ``save_peft_adapter`` under the module names of layer 0, exactly as a run's
task does; the ten client adapters are written the same way. Sizes are the files' bytes on disk
for that one layer, times 32 layers (every layer has the same shapes and ranks, so the folders of
the full model are 32 times as large, plus a config of a few kB). Each folder is read back and
compared with the global model it stores (largest relative Frobenius error of ``B @ A`` per
module). Rows: RB-LoRA after round 1 (every round writes a folder of the same size) and FLoRA's
running total after rounds 1, 2 and 3 (after that it stays the size of round 3).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_aggregation import QUICK, BenchConfig, make_clients

from rblora.adapters import load_peft_adapter, save_peft_adapter
from rblora.federation.rounds import export_global, handed_out
from rblora.federation.server import FederatedServer
from rblora.protocol.types import ClientSpec

PREFIX = "model.layers.0.self_attn."


class ExportTask:
    """The part of a task that writes adapter folders (what ``CausalLMTask.save_adapter`` does)."""

    modules_to_save: list[str] = []
    base_reference = "meta-llama/Llama-3.1-8B"

    def save_adapter(self, path, factors, dense, *, rank, lora_alpha, use_rslora):
        save_peft_adapter(
            path,
            factors,
            rank=rank,
            lora_alpha=lora_alpha,
            target_modules=["q_proj", "v_proj"],
            use_rslora=use_rslora,
            base_model_name_or_path=self.base_reference,
        )


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stored_error(path: Path, delta: dict) -> float:
    """Largest relative Frobenius error of the folder's ``B @ A`` (scale 1) against ``delta``."""
    factors, config = load_peft_adapter(path)
    assert config["lora_alpha"] == config["r"] and not config.get("use_rslora")
    worst = 0.0
    for name, value in delta.items():
        want = value if isinstance(value, torch.Tensor) else value[1] @ value[0]
        a, b = factors[name]
        worst = max(worst, float(torch.linalg.norm(b @ a - want) / torch.linalg.norm(want)))
    return worst


def run(method: str, rounds: int, cfg: BenchConfig, out: Path) -> list[dict]:
    """``rounds`` rounds of ``method``: the global folder and the client folders of each."""
    specs = [ClientSpec(k, r, cfg.lora_alpha) for k, r in enumerate(cfg.ranks)]
    server = FederatedServer(method, specs, selection="all")
    task = ExportTask()
    rows = []
    for t in range(1, rounds + 1):
        clients = make_clients(replace(cfg, seed=cfg.seed + t))
        updates = [
            replace(u, factors={PREFIX + m: f for m, f in u.factors.items()}) for u in clients
        ]
        start = time.perf_counter()
        model = server.redistribute(server.aggregate(updates))
        folder = out / method / f"round_{t}"
        export_global(task, folder / "global", handed_out(model))
        seconds = time.perf_counter() - start
        for k, u in enumerate(updates):
            task.save_adapter(
                folder / f"client_{k}",
                dict(u.factors),
                {},
                rank=cfg.ranks[k],
                lora_alpha=cfg.lora_alpha,
                use_rslora=False,
            )
        factors, config = load_peft_adapter(folder / "global")
        rows.append(
            {
                "method": method,
                "round": t,
                "ranks": {n.removeprefix(PREFIX): a.shape[0] for n, (a, _) in factors.items()},
                "global": folder_bytes(folder / "global"),
                "clients": sum(folder_bytes(folder / f"client_{k}") for k in range(len(specs))),
                "error": stored_error(folder / "global", model.delta),
                "seconds": seconds,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke test)")
    ns = parser.parse_args(argv)
    cfg = QUICK if ns.quick else BenchConfig()
    dense = sum(d_out * d_in for d_out, d_in in cfg.shapes.values()) * 4 * cfg.layers
    gb = 1e9
    print(f"shapes {cfg.shapes}, ranks {list(cfg.ranks)}; sizes x {cfg.layers} layers")
    print(f"dense float32 update of the adapted modules: {dense / gb:.2f} GB")
    print("| folder | ranks q, v | global folder | x dense | 10 client folders | max rel. error |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        rows = run("RB-LoRA", 1, cfg, Path(tmp)) + run("FLoRA", 3, cfg, Path(tmp))
    for r in rows:
        size = r["global"] * cfg.layers
        print(
            f"| {r['method']} round {r['round']} | {r['ranks']['q_proj']}, {r['ranks']['v_proj']} "
            f"| {size / gb:.2f} GB | {size / dense:.2f} | {r['clients'] * cfg.layers / gb:.2f} GB "
            f"| {r['error']:.1e} |"
        )


if __name__ == "__main__":
    main()
