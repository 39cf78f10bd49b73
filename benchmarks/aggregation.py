"""Server aggregation cost: factored truncated SVD vs the dense baseline.

Every round the server turns K client uploads ``(B_i, A_i)`` into one rank-``r``
pair approximating ``sum_i w_i B_i @ A_i``. Two ways, timed side by side on the
same random factors:

* ours  - ``fedsmooth_hf.math.lowrank.truncated_svd``: stack the factors, thin QR on
  each side, SVD of the small ``Kr x Kr`` core. Never forms a ``d_out x d_in`` matrix.
* dense - what the reference code does: form ``D = sum_i w_i B_i @ A_i`` densely,
  then ``torch.linalg.svd(D, full_matrices=False)`` truncated to rank ``r``.

For each shape the script reports both times (dense split into forming the sum and
the SVD), the speedup, an estimate of the extra memory each needs, and checks
optimality: ``||D - B A||_F <= (1 + 1e-4) ||D - D_r||_F`` with ``D_r`` the dense
rank-``r`` truncation (Eckart-Young). Random factors have a flat spectrum, so the
approximation errors are compared, not the factors. The errors are computed in
float64 outside the timed regions.

Usage::

    python benchmarks/aggregation.py                 # LLaMA-7B shapes, K=10, r=16
    python benchmarks/aggregation.py --quick         # small shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, loadavg, machine, usable_cores  # noqa: E402
from recipes.plots import pyplot  # noqa: E402

# isort: split

import torch  # noqa: E402

from fedsmooth_hf.math.lowrank import truncated_svd  # noqa: E402

DEFAULT_SHAPES = "4096x4096,11008x4096"
QUICK_SHAPES = "1024x1024,2048x1024"
OPTIMALITY_RTOL = 1e-4

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x4096,11008x4096"`` -> ``[(4096, 4096), (11008, 4096)]`` as (d_out, d_in)."""
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            d_out, d_in = (int(x) for x in item.split("x"))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"bad shape {item!r}: expected D_OUTxD_IN, e.g. 4096x4096"
            ) from exc
        if d_out < 1 or d_in < 1:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: dimensions must be positive")
        shapes.append((d_out, d_in))
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Compare factored truncated SVD (ours) with dense sum + torch.linalg.svd for LoRA aggregation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shapes", default=None, help=f"comma-separated d_outxd_in (default {DEFAULT_SHAPES})")
    p.add_argument("--clients", type=int, default=10, help="number of client uploads K")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of each upload and of the aggregate")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of ours (median reported)")
    p.add_argument(
        "--dense-repeats", type=int, default=2, help="timed runs of the dense baseline (fastest reported)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS_DIR / "aggregation.json"), help="JSON results path")
    p.add_argument(
        "--plot", default=str(RESULTS_DIR / "aggregation.png"), help="PNG bar chart path ('' to skip)"
    )
    p.add_argument("--quick", action="store_true", help=f"small shapes ({QUICK_SHAPES}) for a smoke test")
    return p


def machine_info() -> dict:
    """:func:`benchmarks._common.machine`, with the cores this process may use and the Python build."""
    return {**machine(), "usable_cores": usable_cores(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_at_start": loadavg()}


def make_uploads(d_out: int, d_in: int, clients: int, rank: int, dtype: torch.dtype, seed: int):
    """K random LoRA uploads and FedAvg weights ``n_c / N`` from random client sizes."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(50, 1000, (clients,), generator=gen)
    weights = (sizes.double() / sizes.sum()).tolist()
    Bs = [torch.randn(d_out, rank, generator=gen, dtype=dtype) / rank**0.5 for _ in range(clients)]
    As = [torch.randn(rank, d_in, generator=gen, dtype=dtype) / d_in**0.5 for _ in range(clients)]
    return Bs, As, weights, sizes.tolist()


def dense_baseline(Bs, As, weights, rank):
    """Reference aggregation: dense weighted sum, full thin SVD, keep the top ``rank``."""
    t0 = time.perf_counter()
    D = torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=Bs[0].dtype)
    for w, B, A in zip(weights, Bs, As):
        D.addmm_(B, A, alpha=w)
    t1 = time.perf_counter()
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    B_r = U[:, :rank] * S[:rank]
    A_r = Vh[:rank].clone()
    t2 = time.perf_counter()
    return D, S, B_r, A_r, t1 - t0, t2 - t1


def _time_ours(Bs, As, weights, rank, repeats):
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = truncated_svd(Bs, As, rank, weights)
        times.append(time.perf_counter() - t0)
    return out, times


def memory_estimate(d_out: int, d_in: int, clients: int, rank: int, itemsize: int) -> dict:
    """Bytes of the large temporaries each method allocates (LAPACK workspace not counted)."""
    k = clients * rank  # total inner rank of the stack
    m = min(d_out, d_in)
    dense_matrix = d_out * d_in * itemsize
    stacked = (d_out + d_in) * k * itemsize  # B_cat and A_cat
    return {
        "dense_matrix_bytes": dense_matrix,
        "stacked_factors_bytes": stacked,
        # D plus the thin SVD outputs U (d_out x m), S, Vh (m x d_in)
        "dense_peak_extra_bytes": dense_matrix + (d_out * m + m + m * d_in) * itemsize,
        # B_cat, A_cat, their Q factors, the k x k cores and the rank-r outputs
        "ours_peak_extra_bytes": 2 * stacked + 4 * k * k * itemsize + (d_out + d_in) * rank * itemsize,
    }


def run_shape(d_out, d_in, args, dtype, seed) -> dict:
    Bs, As, weights, sizes = make_uploads(d_out, d_in, args.clients, args.rank, dtype, seed)

    truncated_svd(Bs, As, args.rank, weights)  # warm-up (allocator, LAPACK init)
    (B, A), ours_times = _time_ours(Bs, As, weights, args.rank, args.repeats)

    form_times, svd_times = [], []
    for _ in range(max(1, args.dense_repeats)):
        D, S, B_r, A_r, t_form, t_svd = dense_baseline(Bs, As, weights, args.rank)
        form_times.append(t_form)
        svd_times.append(t_svd)

    # Optimality, in float64, outside the timed regions.
    D64 = D.double()
    ours_err = float(torch.linalg.norm(D64 - B.double() @ A.double()))
    best_err = float(torch.linalg.norm(D64 - B_r.double() @ A_r.double()))
    tail_err = float(S[args.rank :].double().square().sum().sqrt())
    d_norm = float(torch.linalg.norm(D64))
    del D64

    ours_s = statistics.median(ours_times)
    # Dense: the fastest run, which favours the baseline. On a small shared machine a long SVD can
    # be slowed several-fold by other processes, and with two runs a median would be their mean.
    fastest = min(range(len(form_times)), key=lambda i: form_times[i] + svd_times[i])
    form_s, svd_s = form_times[fastest], svd_times[fastest]
    dense_s = form_s + svd_s
    mem = memory_estimate(d_out, d_in, args.clients, args.rank, torch.empty((), dtype=dtype).element_size())
    return {
        "shape": f"{d_out}x{d_in}",
        "d_out": d_out,
        "d_in": d_in,
        "client_sizes": sizes,
        "weights": weights,
        "ours_s": ours_s,
        "ours_times_s": ours_times,
        "dense_s": dense_s,
        "dense_form_s": form_s,
        "dense_svd_s": svd_s,
        "dense_form_times_s": form_times,
        "dense_svd_times_s": svd_times,
        "speedup": dense_s / ours_s,
        "speedup_vs_svd_only": svd_s / ours_s,
        **mem,
        "memory_ratio": mem["dense_peak_extra_bytes"] / mem["ours_peak_extra_bytes"],
        "dense_norm": d_norm,
        "ours_err": ours_err,
        "best_err": best_err,
        "best_err_from_singular_values": tail_err,
        "err_ratio": ours_err / best_err if best_err > 0 else float("nan"),
        "optimal": bool(ours_err <= (1 + OPTIMALITY_RTOL) * best_err),
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def format_table(results: list[dict], machine: dict, settings: dict) -> str:
    lines = [
        f"Aggregation of K={settings['clients']} rank-{settings['rank']} LoRA uploads to rank {settings['rank']}"
        f" ({settings['dtype']})",
        f"machine: {machine['cpu']} | cores {machine['usable_cores']}/{machine['cores']}"
        f" | torch {machine['torch']} | threads {machine['threads']}",
        f"load avg (1/5/15 min): start {machine['loadavg_at_start']}, end {machine.get('loadavg_at_end')}",
        f"ours: median of {settings['repeats']} | dense: fastest of {settings['dense_repeats']}",
        "",
    ]
    head = (
        f"{'shape':>12} {'ours s':>9} {'dense s':>9} {'(form':>8} {'+ svd)':>9} {'speedup':>9}"
        f" {'mem ours MiB':>13} {'mem dense MiB':>14} {'mem x':>7} {'ours err':>11} {'best err':>11}"
        f" {'ratio-1':>10} {'ok':>3}"
    )
    lines += [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['shape']:>12} {r['ours_s']:>9.4f} {r['dense_s']:>9.3f} {r['dense_form_s']:>8.3f}"
            f" {r['dense_svd_s']:>9.3f} {r['speedup']:>8.0f}x {_mib(r['ours_peak_extra_bytes']):>13}"
            f" {_mib(r['dense_peak_extra_bytes']):>14} {r['memory_ratio']:>6.1f}x {r['ours_err']:>11.6g}"
            f" {r['best_err']:>11.6g} {r['err_ratio'] - 1:>10.2e} {'yes' if r['optimal'] else 'NO':>3}"
        )
    lines.append("")
    lines.append(
        "mem: estimated peak extra bytes (dense: D + thin-SVD U,S,Vh; ours: stacked factors + Q factors + cores);"
        " ok: ours_err <= (1 + 1e-4) * best_err"
    )
    return "\n".join(lines)


def plot(results: list[dict], settings: dict, machine: dict, path: Path) -> None:
    plt = pyplot()

    n = len(results)
    fig, ax = plt.subplots(figsize=(2.2 + 2.0 * n, 4.2))
    xs = list(range(n))
    width = 0.38
    ours = [r["ours_s"] for r in results]
    dense = [r["dense_s"] for r in results]
    ax.bar([x - width / 2 for x in xs], ours, width, label="ours: factored truncated SVD", color="tab:blue")
    ax.bar([x + width / 2 for x in xs], dense, width, label="dense sum + torch.linalg.svd", color="tab:gray")
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([r["shape"] for r in results])
    ax.set_xlabel("d_out x d_in")
    ax.set_ylabel("time (s, log scale)")
    top = max(dense + ours)
    ax.set_ylim(min(dense + ours) / 3, top * 6)
    for x, r in zip(xs, results):
        ax.annotate(
            f"{r['speedup']:.0f}x faster",
            xy=(x, max(r["dense_s"], r["ours_s"]) * 1.4),
            ha="center",
            va="bottom",
            fontsize=9,
            fontweight="bold",
        )
    ax.set_title(
        f"LoRA aggregation, K={settings['clients']}, r={settings['rank']}, {settings['dtype']}\n"
        f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    shapes = parse_shapes(args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES))
    if args.clients < 1 or args.rank < 1 or args.repeats < 1 or args.threads < 1:
        raise SystemExit("--clients, --rank, --repeats and --threads must be positive")
    for d_out, d_in in shapes:
        if args.rank > min(d_out, d_in):
            raise SystemExit(f"--rank {args.rank} exceeds min dimension of shape {d_out}x{d_in}")

    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    machine = machine_info()
    settings = {
        "shapes": [f"{o}x{i}" for o, i in shapes],
        "clients": args.clients,
        "rank": args.rank,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "dense_repeats": max(1, args.dense_repeats),
        "threads": args.threads,
        "seed": args.seed,
        "quick": args.quick,
        "optimality_rtol": OPTIMALITY_RTOL,
    }

    # One-off LAPACK/BLAS initialisation so neither method pays it inside its timing.
    warm = torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=dtype)
    torch.linalg.qr(warm)
    torch.linalg.svd(warm)

    results = []
    for j, (d_out, d_in) in enumerate(shapes):
        print(
            f"[aggregation] {d_out}x{d_in}: timing ours x{args.repeats} and dense x{settings['dense_repeats']} ...",
            file=sys.stderr,
            flush=True,
        )
        results.append(run_shape(d_out, d_in, args, dtype, args.seed + j))

    machine["loadavg_at_end"] = loadavg()
    out = {
        "benchmark": "aggregation",
        "settings": settings,
        "machine": machine,
        "results": results,
        "all_optimal": all(r["optimal"] for r in results),
    }
    print(format_table(results, machine, settings), flush=True)

    if args.out:
        out_path = Path(args.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {out_path}")
    if args.plot:
        plot(results, settings, machine, Path(args.plot))
        print(f"wrote {args.plot}")
    if not out["all_optimal"]:
        bad = [r["shape"] for r in results if not r["optimal"]]
        print(f"WARNING: optimality check failed for {bad}", file=sys.stderr)
    return out


if __name__ == "__main__":
    sys.exit(0 if main()["all_optimal"] else 1)
