"""Size of the server's checkpoint (``checkpoint/server.safetensors``) after a round.

    .venv/bin/python benchmarks/bench_checkpoint_size.py --model smollm2 --ranks 4,4,8,8,16,16,32,32,64,64
    .venv/bin/python benchmarks/bench_checkpoint_size.py --model llama --layers 1

Ten clients (ranks ``--ranks``, default the seed's) hold random LoRA factors (fixed seed) on the
attention's ``q_proj`` and ``v_proj`` of ``--layers`` layers; a ``FederatedServer`` aggregates
them with ``--method`` (its default redistribution unless ``--reduction``), redistributes, and
the checkpoint is written by ``RunFolder.save_checkpoint``, as after every round of a run. Prints
the file's size, per layer, and for the model's full depth (``--layers`` less than the model's:
extrapolated, the size is linear in the layers). Uses only the server's public API, so the same
script measures any version of the package (``PYTHONPATH`` chooses).
"""  # noqa: E501

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from rblora.aggregation import ClientUpdate
from rblora.federation.rundir import CHECKPOINT, RunFolder
from rblora.federation.server import FederatedServer
from rblora.protocol.types import ClientSpec

MODELS = {  # name -> ((d_out, d_in) of q_proj and v_proj, layers)
    "smollm2": ({"q_proj": (576, 576), "v_proj": (192, 576)}, 30),
    "llama": ({"q_proj": (4096, 4096), "v_proj": (1024, 4096)}, 32),
}
SEED_RANKS = "4,4,16,16,64,64,128,128,256,256"


def random_update(spec: ClientSpec, modules: dict[str, tuple[int, int]], gen) -> ClientUpdate:
    """A client's trained adapter: ``A ~ N(0, 1/d_in)``, ``B ~ N(0, 1)`` on every module."""
    factors = {
        name: (
            torch.randn(spec.rank, d_in, generator=gen) / d_in**0.5,
            torch.randn(d_out, spec.rank, generator=gen),
        )
        for name, (d_out, d_in) in modules.items()
    }
    return ClientUpdate(spec.num_examples, spec.lora_alpha, factors, client_id=spec.client_id)


def measure(model: str, layers: int, ranks: list[int], method: str, reduction: str | None) -> dict:
    shapes, depth = MODELS[model]
    modules = {
        f"model.layers.{i}.self_attn.{name}": shape
        for i in range(layers)
        for name, shape in shapes.items()
    }
    specs = [ClientSpec(k, r, 16.0, num_examples=100 * (k + 1)) for k, r in enumerate(ranks)]
    server = FederatedServer(method, specs, reduction=reduction, selection="all")
    gen = torch.Generator().manual_seed(0)
    server.redistribute(server.aggregate([random_update(s, modules, gen) for s in specs]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = RunFolder(tmp)
        folder.save_checkpoint(*server.state_tensors())
        size = (folder.path / CHECKPOINT / "server.safetensors").stat().st_size
    return {
        "model": model,
        "method": method,
        "reduction": server.reduction or "default",
        "ranks": ranks,
        "layers_computed": layers,
        "bytes": size,
        "MB_per_layer": round(size / layers / 1e6, 2),
        f"MB_{depth}_layers": round(size / layers * depth / 1e6, 1),
        "extrapolated": layers != depth,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--layers", type=int, default=None, help="layers computed (default all)")
    parser.add_argument("--ranks", default=SEED_RANKS, help="comma-separated client ranks")
    parser.add_argument("--method", default="RB-LoRA")
    parser.add_argument("--reduction", default=None, choices=["svd", "truncate", "merge"])
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    layers = MODELS[args.model][1] if args.layers is None else args.layers
    print(json.dumps(measure(args.model, layers, ranks, args.method, args.reduction)))


if __name__ == "__main__":
    main()
