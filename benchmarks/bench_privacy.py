"""Cost and accuracy of client-level DP's server step on one Llama-3.1-8B attention layer.

    .venv/bin/python benchmarks/bench_privacy.py            # full shapes, a few minutes
    .venv/bin/python benchmarks/bench_privacy.py --quick    # small shapes, seconds (smoke test)

Ten clients with the seed's ranks [4, 4, 16, 16, 64, 64, 128, 128, 256, 256] hold random LoRA
factors for ``q_proj`` (4096 x 4096) and ``v_proj`` (1024 x 4096). We time RB-LoRA's private
aggregation (clipping from r x r products, fixed weights, the dense sum, seeded Gaussian noise)
and the start basis of width 256 every client is cut from (a seeded randomized range finder per
module), then, with ``--dense``, the dense float64 SVD of the same noised ``q_proj`` (what the
range finder replaces) and the range finder's error against it: the excess Frobenius error of
the rank-r approximation over the optimal one, and the relative distance between the two
rank-r approximations, for r = 4 and 256.
"""

from __future__ import annotations

import argparse
import time

import torch

from rblora.aggregation import ClientUpdate
from rblora.aggregation.privacy import ClientDP, new_noise_key, private_aggregate, secret_generator

RANKS = (4, 4, 16, 16, 64, 64, 128, 128, 256, 256)
SIZES = (500, 500, 1000, 1000, 1500, 1500, 1900, 1900, 2500, 2500)
FULL = {"q_proj": (4096, 4096), "v_proj": (1024, 4096)}
QUICK = {"q_proj": (512, 512), "v_proj": (128, 512)}
QUICK_RANKS = (2, 2, 4, 4, 8, 8, 16, 16, 32, 32)


def clients(shapes, ranks, seed=0) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, (r, n) in enumerate(zip(ranks, SIZES, strict=True)):
        factors = {
            m: (
                torch.randn(r, d_in, generator=gen) / d_in**0.5,
                torch.randn(d_out, r, generator=gen) * 1e-2,
            )
            for m, (d_out, d_in) in shapes.items()
        }
        out.append(ClientUpdate(num_examples=n, lora_alpha=16.0, factors=factors, client_id=k))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--dense", action="store_true", help="also the dense SVD and the error")
    parser.add_argument("--clip", type=float, default=0.05)
    parser.add_argument("--noise_multiplier", type=float, default=1.0)
    args = parser.parse_args(argv)
    shapes, ranks = (QUICK, QUICK_RANKS) if args.quick else (FULL, RANKS)
    updates = clients(shapes, ranks)
    dp = ClientDP(args.clip, args.noise_multiplier, 1.0, ranks, SIZES)
    start = time.perf_counter()
    noise = secret_generator(new_noise_key(), 1)
    g, report = private_aggregate("RB-LoRA", updates, dp, noise=noise, sketch_seed=1)
    aggregated = time.perf_counter() - start
    start = time.perf_counter()
    g.start_basis(max(ranks))
    basis = time.perf_counter() - start
    print(f"shapes {shapes}, ranks {list(ranks)}, clip {args.clip}, z {args.noise_multiplier}")
    print(f"term norms: {', '.join(f'{x:.3g}' for x in report.norms)} ({report.clipped} clipped)")
    print(f"private aggregation (clip, fixed weights, dense sum, noise): {aggregated:.2f} s")
    width = max(ranks)
    print(f"start basis of width {width} (randomized range finder, both modules): {basis:.2f} s")
    if args.dense:
        m = g.delta("q_proj").double()
        start = time.perf_counter()
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        print(f"dense float64 SVD of q_proj: {time.perf_counter() - start:.1f} s")
        for r in sorted({min(ranks), max(ranks)}):
            best = (u[:, :r] * s[:r]) @ vh[:r]
            a, b = g.start_basis(max(ranks)).factors["q_proj"]
            approx = b[:, :r].double() @ a[:r].double()
            excess = float((m - approx).norm() / (m - best).norm()) - 1
            distance = float((approx - best).norm() / best.norm())
            print(f"rank {r}: excess error {excess:.2e}, distance to the dense SVD's "
                  f"{distance:.2e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
