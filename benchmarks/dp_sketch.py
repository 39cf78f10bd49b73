"""Client-level DP's product release: the sketch's error without noise, and the DP path's server cost.

A product strategy (FedSmoothLoRA, FlexLoRA) aggregates ``SVD_r(mean_c B_c A_c)``. Under DP the
mean is released by a two-pass sketch of width ``k`` (``fedsmooth_hf.math.privacy``), exact
when ``k >= rank(sum)`` and a randomized SVD when smaller. Two measurements, side by side on the
same uploads:

* error: ``||SVD_r(sketch) - SVD_r(exact)||_F / ||SVD_r(exact)||_F`` with no noise, for a
  range of widths (the exact aggregate is the factored one, ``lowrank.truncated_svd``);
* cost: one round's server work at SmolLM2-135M's layer shapes, the plain factored aggregate
  vs the DP path (clip norms from Grams, both sketch passes with noise, ``SVD_r``), everything
  included in each timer.

Uploads mimic real client updates: a direction all clients share plus their own, with a
decaying spectrum (a flat-spectrum random sum is the worst case for any sketch).

Usage::

    python benchmarks/dp_sketch.py            # SmolLM2-135M shapes, 10 clients, r = 8
    python benchmarks/dp_sketch.py --quick    # small shapes, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, machine  # noqa: E402
from recipes.plots import pyplot, save  # noqa: E402

# isort: split
import torch  # noqa: E402

from fedsmooth_hf.math.lowrank import truncated_svd  # noqa: E402
from fedsmooth_hf.math.privacy import clip_scale, noisy_product_sum, product_norm  # noqa: E402

#: SmolLM2-135M's adapted layer shapes (d_out, d_in), one transformer block; it has 30 blocks
SMOLLM2_BLOCK = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576),
                 "up": (1536, 576), "down": (576, 1536)}


def client_uploads(shapes: dict, clients: int, rank: int, seed: int) -> list[dict]:
    """Per client ``module -> (B, A)``: a shared rank-r update plus its own, spectrum ``0.7^i``."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.tensor([0.7 ** i for i in range(rank)])
    shared = {n: (torch.randn(d_out, rank, generator=g) * decay, torch.randn(rank, d_in, generator=g) / d_in ** 0.5)
              for n, (d_out, d_in) in shapes.items()}
    uploads = []
    for _ in range(clients):
        own = {}
        for n, (d_out, d_in) in shapes.items():
            B = torch.randn(d_out, rank, generator=g) * decay * 0.5
            A = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
            own[n] = (torch.cat([shared[n][0], B], 1), torch.cat([shared[n][1], A], 0))
            own[n] = truncated_svd([own[n][0]], [own[n][1]], rank)  # a client uploads rank r
        uploads.append(own)
    return uploads


def sketch_error(uploads: list[dict], shapes: dict, rank: int, widths: list[int]) -> dict[int, float]:
    """Relative error of the noiseless sketched aggregate against the exact factored one, per width."""
    n = len(uploads)
    exact = {name: truncated_svd([u[name][0] for u in uploads], [u[name][1] for u in uploads], rank, [1 / n] * n)
             for name in shapes}
    out = {}
    for k in widths:
        released = noisy_product_sum(uploads, [1.0] * n, 0.0, shapes, k, torch.Generator().manual_seed(0),
                                     torch.Generator().manual_seed(1))
        num = den = 0.0
        for name, (Q, Z) in released.items():
            B, A = truncated_svd([Q], [Z / n], rank)
            Be, Ae = exact[name]
            num += float(torch.linalg.norm(B @ A - Be @ Ae)) ** 2
            den += float(torch.linalg.norm(Be @ Ae)) ** 2
        out[k] = (num / den) ** 0.5
    return out


def round_cost(uploads: list[dict], shapes: dict, rank: int, width: int, blocks: int, repeats: int) -> dict:
    """Seconds of one round's server aggregate over ``blocks`` blocks: plain vs DP, median of ``repeats``."""
    n = len(uploads)

    def plain():
        for _ in range(blocks):
            for name in shapes:
                truncated_svd([u[name][0] for u in uploads], [u[name][1] for u in uploads], rank, [1 / n] * n)

    def private():
        for _ in range(blocks):
            scales = [clip_scale(product_norm(u), 1.0) for u in uploads]
            released = noisy_product_sum(uploads, scales, 0.5, shapes, width, torch.Generator().manual_seed(0),
                                         torch.Generator().manual_seed(1))
            for Q, Z in released.values():
                truncated_svd([Q], [Z / n], rank)

    times = {}
    for label, fn in (("plain", plain), ("dp", private)):
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        times[label] = sorted(runs)[len(runs) // 2]
    return {"plain_s": times["plain"], "dp_s": times["dp"], "ratio": times["dp"] / times["plain"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (CI)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS_DIR / "dp_sketch.json"))
    args = parser.parse_args(argv)
    shapes = {"q": (48, 40), "down": (40, 96)} if args.quick else SMOLLM2_BLOCK
    r = args.rank
    widths = sorted({r, r + 8, 2 * r + 8, 4 * r, args.clients * r})
    errors = {k: [] for k in widths}
    for seed in range(args.seeds):
        for k, e in sketch_error(client_uploads(shapes, args.clients, r, seed), shapes, r, widths).items():
            errors[k].append(e)
    cost = round_cost(client_uploads(shapes, args.clients, r, 0), shapes, r, 2 * r + 8,
                      blocks=1 if args.quick else 30, repeats=3)
    result = {"machine": machine(), "clients": args.clients, "rank": r, "seeds": args.seeds,
              "shapes": {k: list(v) for k, v in shapes.items()},
              "relative_error_by_width": {str(k): v for k, v in errors.items()},
              "default_width": 2 * r + 8, "round_cost": cost}
    print(f"{'width k':>8} | relative error of SVD_r, no noise (mean over {args.seeds} seeds)")
    for k, v in errors.items():
        print(f"{k:>8} | {sum(v) / len(v):.2e}  (max {max(v):.2e})")
    print(f"server round at {'quick' if args.quick else 'SmolLM2-135M'} shapes, {args.clients} clients: "
          f"plain {cost['plain_s']:.3f} s, DP {cost['dp_s']:.3f} s, ratio {cost['ratio']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.errorbar(widths, [sum(v) / len(v) for v in errors.values()],
                yerr=[max(v) - min(v) for v in errors.values()], marker="o")
    ax.axvline(2 * r + 8, ls="--", c="gray", label=f"default k = 2r + 8 = {2 * r + 8}")
    ax.set(xscale="log", yscale="log", xlabel="sketch width k",
           ylabel="relative error of SVD_r (no noise)",
           title=f"DP product release: {args.clients} clients, r = {r}")
    ax.legend()
    save(fig, out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
