"""The server's memory and time against the number of replies a round folds in.

    .venv/bin/python benchmarks/bench_server_scale.py                  # 10 .. 10,000 replies
    .venv/bin/python benchmarks/bench_server_scale.py --quick          # seconds (what tests run)
    .venv/bin/python benchmarks/bench_server_scale.py --counts 10,1000 --shapes dinov2

Each case runs in a fresh process: a ``FederatedServer`` with K clients folds K synthetic
replies as they arrive (``FederatedServer.fold``, then ``aggregate`` and ``redistribute``, as a
round does), at the shapes of the embedded models' adapted modules (SmolLM2-135M: q_proj
576x576 and v_proj 192x576 in 30 layers; DINOv2 ViT-S/14: query and value 384x384 in 12
layers), client ranks cycled from the main job's list (SmolLM2) or the seed's (DINOv2). The
replies come from a pool of 8 random client updates per rank (generating 10,000 distinct
updates would time the random generator, not the server); each is a new ClientUpdate with its
own client id, dropped after it is folded, as a server drops a decoded reply. Printed per
case: the server's memory, that is the peak resident memory from the first reply to the end of
the round (the kernel's high-water mark ``VmHWM``, reset through ``/proc/self/clear_refs`` when
the first reply arrives) above the resident memory at that moment, and its ratio to the 10-reply
case; the peak resident memory of the whole process (``ru_maxrss``: imports, the reply pool and
the server); the seconds the fold and the aggregation took, and seconds per reply (linear in K
when flat).

Why not the process peak alone: the pool of synthetic replies (about 280 MB at DINOv2's shapes)
is the benchmark's, and the resident memory it takes differs from one process to the next. On
the 2-core machine of 2026-12-04 identical 10-reply processes held 490 or 750 MB after making
it, at random, so the process peak read 1.44x at 1,000 replies in one run and 1.00x in the next.
The server's part did not change (91-98 MB in both).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

SHAPES = {
    "smollm2": {"layers": 30, "modules": {"q_proj": (576, 576), "v_proj": (192, 576)},
                "ranks": [4, 4, 8, 8, 16, 16, 32, 32, 64, 64]},
    "dinov2": {"layers": 12, "modules": {"query": (384, 384), "value": (384, 384)},
               "ranks": [4, 4, 16, 16, 64, 64, 128, 128, 256, 256]},
}  # fmt: skip
QUICK = {"layers": 2, "modules": {"q": (48, 40), "v": (24, 40)}, "ranks": [2, 4, 8]}
POOL = 8


def one_case(shape: dict, method: str, count: int, private: bool) -> dict:
    """Fold ``count`` replies in this process; return its figures."""
    from rblora.aggregation import ClientUpdate
    from rblora.federation.privacy import PrivacySettings
    from rblora.federation.server import FederatedServer
    from rblora.protocol.types import ClientSpec, UpdateLayout

    modules = {
        f"layers.{i}.{name}": dims
        for i in range(shape["layers"])
        for name, dims in shape["modules"].items()
    }
    ranks = [shape["ranks"][k % len(shape["ranks"])] for k in range(count)]
    specs = [ClientSpec(k, r, 16.0, num_examples=6 + k % 5) for k, r in enumerate(ranks)]
    privacy = None
    if private:
        privacy = PrivacySettings(clip=0.5, noise_multiplier=1.0, sample_rate=1.0,
                                  sampling="poisson", delta=1e-6, accountant="rdp")  # fmt: skip
    server = FederatedServer(method, specs, selection="all", privacy=privacy,
                             layout=UpdateLayout(modules))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    pool = {
        r: [
            {m: (torch.randn(r, d_in, generator=gen) / d_in**0.5,
                 torch.randn(d_out, r, generator=gen) * 1e-2)
             for m, (d_out, d_in) in modules.items()}
            for _ in range(POOL)
        ]
        for r in sorted(set(ranks))
    }  # fmt: skip
    base_mb = _watermark_reset()  # the server's memory is counted from its first reply
    start = time.perf_counter()
    for spec in specs:
        factors = pool[spec.rank][spec.client_id % POOL]
        server.fold(ClientUpdate(spec.num_examples, spec.lora_alpha, factors,
                                 client_id=spec.client_id))  # fmt: skip
    folded = time.perf_counter() - start
    start = time.perf_counter()
    server.redistribute(server.aggregate())
    closed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB (Linux)
    server = (_status_mb("VmHWM") if base_mb is not None else peak) - (base_mb or 0.0)
    return {"peak_mb": peak, "server_mb": server, "watermark": base_mb is not None,
            "fold_s": folded, "close_s": closed}  # fmt: skip


def _status_mb(field: str) -> float:
    """A memory figure of this process from ``/proc/self/status`` (Linux), in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise OSError(f"/proc/self/status has no {field}")


def _watermark_reset() -> float | None:
    """Reset the kernel's peak-resident mark of this process and return the resident memory
    now (MB); None where that cannot be done (not Linux): the process peak is reported then."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # 5: reset the peak resident set size (Linux 4.0+)
        return _status_mb("VmRSS")
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 10 and 100 replies")
    parser.add_argument("--counts", default="10,100,1000,10000")
    parser.add_argument("--shapes", default="smollm2,dinov2")
    parser.add_argument("--methods", default="RB-LoRA,FlexLoRA,Weighted HETLoRA")
    parser.add_argument("--dp", default="off,on", help="off, on or both (off,on)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # a child process runs one case
    args = parser.parse_args(argv)
    if args.case:
        shape, method, count, private = json.loads(args.case)
        print(json.dumps(one_case(shape, method, count, private)))
        return 0
    counts = [10, 100] if args.quick else [int(c) for c in args.counts.split(",")]
    shapes = {"quick": QUICK} if args.quick else {s: SHAPES[s] for s in args.shapes.split(",")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| shapes | method | DP | replies | server (MB) | x 10 replies | process peak (MB) | "
          "fold (s) | s per reply | aggregate + redistribute (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, shape in shapes.items():
        for method in args.methods.split(","):
            for dp in args.dp.split(","):
                base = None
                for count in counts:
                    case = json.dumps([shape, method, count, dp == "on"])
                    proc = subprocess.run([sys.executable, __file__, "--case", case],
                                          capture_output=True, text=True, check=True)  # fmt: skip
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    base = base or r["server_mb"]
                    server = f"{r['server_mb']:.0f}" + ("" if r["watermark"] else " (peak)")
                    print(
                        f"| {name} | {method} | {dp} | {count} | {server} | "
                        f"{r['server_mb'] / base:.2f} | {r['peak_mb']:.0f} | {r['fold_s']:.2f} | "
                        f"{r['fold_s'] / count:.4f} | {r['close_s']:.2f} |",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
