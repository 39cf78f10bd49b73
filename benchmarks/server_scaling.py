"""How the server's cost grows with the number of clients K and the rank r (issue #25, item 6).

``aggregation.py`` times one aggregate (K=10, r=16) and ``systems.py memory`` a tiny model's peak RSS from 2 to
128 clients; neither says what a server round costs at a real model's shapes as K and r grow. This script takes
one LLaMA-7B decoder block (hidden 4096, MLP 11008) with the modules the recipes adapt by default (every Linear
but the head: q, k, v, o 4096x4096, gate, up 11008x4096, down 4096x11008), float32, random uploads, one thread:

* **seconds per round**: the server part of ``RoundEngine.run_round`` on a real ``FederatedTrainer``:
  ``strategy.aggregate`` of K uploads, the server optimizer's step, ``apply_server_update`` (``merge_into_base``,
  the global adapter), the record's ``merge_norm``; median of ``--repeats``. A 7B model with 64 uploads does not
  fit a small machine: the 32-block figure is a **projection**, 32 x one block (modules are handled one by one).
* **memory**: each cell in a fresh subprocess, RSS sampled every 20 ms (``overhead.PeakRSS``): the uploads held,
  the round's extra above them, the factored SVD's analytic bytes (``aggregation.memory_estimate``), K from 2 to
  128; and ``memory.json``'s rows re-run by ``systems.memory``.
* **the current figures**: ``aggregation.json``'s cell re-timed here at one thread, scaled by the documented work
  ``(d_out + d_in) (K r)^2`` per module, +10%, bounds each aggregate; ``memory.json``'s growth (+8.2% from 2 to
  128) is set beside the re-run. ``--quick``: tiny shapes, cells in this process (CI).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from operator import itemgetter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, ROOT, loadavg, machine  # noqa: E402
from recipes.plots import pyplot, save  # noqa: E402

# isort: split

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from benchmarks import systems  # noqa: E402
from benchmarks.aggregation import make_uploads, memory_estimate  # noqa: E402
from benchmarks.overhead import PeakRSS, build_data, training_args  # noqa: E402
from fedsmooth_hf import FederatedArguments, FederatedTrainer  # noqa: E402
from fedsmooth_hf.math.lowrank import truncated_svd  # noqa: E402
from fedsmooth_hf.model.adapter import lora_scaling  # noqa: E402

BLOCK_7B, BLOCK_QUICK, BLOCKS_7B = (4096, 11008), (256, 688), 32  # (hidden, MLP) of a block; LLaMA-7B's blocks
LLAMA_7B_FP32_BYTES = 6_738_415_616 * 4  # all of LLaMA-7B's parameters in fp32 (embeddings and head included)
VOCAB, ALLOWANCE, MiB = 256, 0.10, 2**20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and sizes, timing cells in this process (CI)")
    p.add_argument("--clients", default=None, help="K values of the timing grid (default 4,16,64; quick 2,4,8)")
    p.add_argument("--ranks", default=None, help="r values of the timing grid (default 8,32; quick 2,4)")
    p.add_argument("--strategies", default="fedit,fedsmoothlora", help="registered strategy names")
    p.add_argument("--memory-clients", default=None, help="K of the memory rows (default 2,8,32,128; quick 2,8,32)")
    p.add_argument("--memory-strategies", default=None, help="of the memory rows (default --strategies; quick one)")
    p.add_argument("--memory-rank", type=int, default=None, help="r of the memory rows (default 8; quick 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed server rounds per cell (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default results/server_scaling[_quick].json)")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON's with .png; '' to skip)")
    p.add_argument("--note", default="", help="what else ran on the machine (kept in the JSON)")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # a child's JSON spec
    return p


def build_trainer(strategy: str, clients: int, rank: int, hidden: int, ffn: int, out: str):
    """A real ``FederatedTrainer`` on a one-block Llama (LoRA on its seven Linears, the recipes' default).

    Args:
        strategy, clients, rank, hidden, ffn, out: strategy name, K, r (alpha = 2 r), block sizes, output folder.
    """
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=1,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128)
    fed = FederatedArguments(strategy=strategy, num_clients=clients, num_rounds=1, local_steps=1, lora_r=rank,
                             lora_alpha=2 * rank, eval_rounds=0)
    # 2 examples a client < ga_samples, unused here: that warning is off for this call only (--quick shares a process)
    calibration_log = logging.getLogger("fedsmooth_hf.model.gradients")
    level = calibration_log.level
    calibration_log.setLevel(logging.ERROR)
    try:
        return FederatedTrainer(model=LlamaForCausalLM(config), args=training_args(out, 1), fed_args=fed,
                                train_dataset=build_data(2 * clients, VOCAB, 8))
    finally:
        calibration_log.setLevel(level)


def round_uploads(trainer, clients: int, rank: int, seed: int):
    """K random uploads per adapted module (``aggregation.make_uploads``) and the example counts.

    Args:
        trainer: from :func:`build_trainer`; clients, rank: K and r; seed: module j draws with ``seed + j``.
    """
    uploads, sizes = {c: {} for c in range(clients)}, None
    for j, (name, (B0, A0)) in enumerate(trainer.strategy.init_lora.items()):
        Bs, As, _, drawn = make_uploads(B0.shape[0], A0.shape[1], clients, rank, torch.float32, seed + j)
        sizes = sizes or drawn
        for c in range(clients):
            uploads[c][name] = (Bs[c], As[c])
    return uploads, {c: float(n) for c, n in enumerate(sizes)}


def server_round(trainer, uploads, weights, round_idx: int):
    """What ``RoundEngine.run_round`` does on the server between the clients' results and the record.

    Args:
        trainer: the server's trainer; uploads, weights: ``{client: factors}``, ``{client: examples}``;
        round_idx: 0-based round. Returns the ``ServerUpdate`` and the seconds of each phase.
    """
    s, t0 = trainer.strategy, time.perf_counter()
    s.begin_round(round_idx)
    previous = s.global_lora()
    update = trainer.server_optimizer.step(s.aggregate(uploads, weights), previous, s.server_space)
    t1 = time.perf_counter()
    trainer.apply_server_update(update, None)
    t2 = time.perf_counter()
    update.merge_norm()  # the round record's
    return update, {"aggregate_s": t1 - t0, "apply_s": t2 - t1, "record_s": time.perf_counter() - t2}


def dense_checks(trainer, uploads, weights, update, before: dict, rounds: int) -> dict:
    """Errors against dense float64 references (small shapes only): the aggregate, and the base's change.

    Args:
        trainer, uploads, weights: as for :func:`server_round`; update: the last round's;
        before: the base weights before the first round; rounds: how many rounds merged since.
    """
    agg_err, merge_err, w = 0.0, 0.0, {c: weights[c] / sum(weights.values()) for c in uploads}
    for name, layer in trainer.layers.items():
        D = sum(w[c] * uploads[c][name][0].double() @ uploads[c][name][1].double() for c in uploads)
        delta = layer.get_base_layer().weight.detach().double() - before[name]
        if update.merge:  # the best rank-r approximation of the weighted sum, merged into W every round
            B, A = (t.double() for t in update.merge[name])
            U, S, Vh = torch.linalg.svd(D, full_matrices=False)
            best = torch.linalg.norm(D - (U[:, :B.shape[1]] * S[:B.shape[1]]) @ Vh[:B.shape[1]])
            agg_err = max(agg_err, float(torch.linalg.norm(D - B @ A) / best) - 1.0)
            expected = rounds * lora_scaling(layer) * (B @ A)
            merge_err = max(merge_err, float(torch.linalg.norm(delta - expected) / torch.linalg.norm(expected)))
        else:  # FedIT-like: the global adapter is the mean of the factors; nothing merged
            Bg, Ag = (t.double() for t in update.global_lora[name])
            Bm, Am = (sum(w[c] * uploads[c][name][i].double() for c in uploads) for i in (0, 1))
            agg_err = max(agg_err, float(torch.linalg.norm(Bg @ Ag - Bm @ Am) / torch.linalg.norm(Bm @ Am)))
            merge_err = max(merge_err, float(torch.linalg.norm(delta)))
    measures = "Eckart-Young ratio - 1; ||dW - n s B A|| / ||n s B A||" if update.merge else "relative; ||dW||"
    return {"aggregate_err": agg_err, "merge_err": merge_err, "measures": measures}


def run_cell(spec: dict) -> dict:
    """One (strategy, K, r) cell: build the trainer and uploads, time ``repeats`` server rounds, sample RSS.

    Args:
        spec: ``strategy``, ``clients``, ``rank``, ``repeats``, ``block`` (hidden, MLP), ``seed``, ``check``.
    """
    torch.set_num_threads(1)
    hidden, ffn = spec["block"]

    def resident() -> int:  # RSS once freed temporaries are handed back (gc; glibc's malloc_trim where it exists)
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        return psutil.Process().memory_info().rss

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(spec["strategy"], spec["clients"], spec["rank"], hidden, ffn, tmp)
        rss_model = resident()
        uploads, weights = round_uploads(trainer, spec["clients"], spec["rank"], spec["seed"])
        rss_loaded = resident()
        before = {n: m.get_base_layer().weight.detach().double().clone() for n, m in trainer.layers.items()} \
            if spec["check"] else None
        with PeakRSS() as mem:
            rounds = [server_round(trainer, uploads, weights, i) for i in range(spec["repeats"])]
        update, phases = rounds[-1][0], [times for _, times in rounds]
        shapes = [(B.shape[0], A.shape[1]) for B, A in trainer.strategy.init_lora.values()]
        row = {**{k: spec[k] for k in ("strategy", "clients", "rank", "repeats")}, "inner_rank": spec["clients"]
               * spec["rank"], "modules": list(trainer.layers), "shapes": [f"{o}x{i}" for o, i in shapes],
               "round_times": phases, **{k: statistics.median(p[k] for p in phases) for k in phases[0]},
               "round_s": statistics.median(sum(p.values()) for p in phases), "rss_model_bytes": rss_model,
               "uploads_bytes": sum(B.numel() * 4 + A.numel() * 4 for up in uploads.values() for B, A in up.values()),
               "base_block_bytes": sum(m.get_base_layer().weight.numel() * 4 for m in trainer.layers.values()),
               "rss_uploads_bytes": rss_loaded - rss_model, "peak_rss_bytes": mem.peak,
               "round_extra_bytes": max(0, mem.peak - rss_loaded), "svd_extra_bytes_analytic": max(
                   memory_estimate(o, i, spec["clients"], spec["rank"], 4)["ours_peak_extra_bytes"] for o, i in shapes)}
        row["projected_32_blocks_s"] = BLOCKS_7B * row["round_s"]
        if spec["check"]:
            row["checks"] = dense_checks(trainer, uploads, weights, update, before, spec["repeats"])
    row["loadavg"] = loadavg()
    return row


def cell_in_child(spec: dict) -> dict:
    """:func:`run_cell` of ``spec`` in a fresh interpreter, so one cell's allocations cannot hide another's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--cell", json.dumps(spec)],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"cell {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference_cell(shape: int, repeats: int, seed: int) -> dict:
    """``aggregation.json``'s cell (K=10, r=16, ``truncated_svd``) re-timed here, one thread, median.

    Args:
        shape: d_out = d_in; repeats: timed runs (at least 5); seed: of the uploads.
    """
    Bs, As, weights, _ = make_uploads(shape, shape, 10, 16, torch.float32, seed)
    times = timeit.repeat(lambda: truncated_svd(Bs, As, 16, weights), number=1, repeat=max(5, repeats) + 1)[1:]
    return {"shape": f"{shape}x{shape}", "clients": 10, "rank": 16, "s": statistics.median(times), "times_s": times}


def current_figures() -> dict:
    """The figures this is compared with, read from the committed result files."""
    agg = json.loads((RESULTS_DIR / "aggregation.json").read_text())
    row = next(r for r in agg["results"] if r["shape"] == "4096x4096")
    mem = json.loads((RESULTS_DIR / "memory.json").read_text())
    return {"aggregation_s": row["ours_s"], "aggregation_threads": agg["settings"]["threads"],
            "aggregation_cpu": agg["machine"].get("cpu"), "memory_growth": mem["peak_rss_growth"]}


def time_bound(row: dict, ref: dict) -> float:
    """The re-timed reference scaled by each module's work ``(d_out + d_in) k^2``, +10%, summed over modules
    (never below the reference itself: a smaller aggregate's fixed costs are not held against it).

    Args:
        row: a cell of :func:`run_cell`; ref: :func:`reference_cell`'s result.
    """
    work_ref = 2 * int(ref["shape"].split("x")[0]) * (ref["clients"] * ref["rank"]) ** 2
    dims = [[int(x) for x in shape.split("x")] for shape in row["shapes"]]
    return sum(max(ref["s"], (1 + ALLOWANCE) * ref["s"] * (o + i) * row["inner_rank"] ** 2 / work_ref) for o, i in dims)


def summarize(cells, memory_rows, e2e, ref, current) -> dict:
    """Bounds and verdicts: each cell against the work-scaled reference, memory growth against +10%.

    Args:
        cells, memory_rows: :func:`run_cell` rows; e2e, ref, current: systems.memory's, the reference's, the figures.
    """
    for row in cells:
        bound = time_bound(row, ref)
        row.update(aggregate_bound_s=bound, aggregate_vs_bound=row["aggregate_s"] / bound,
                   aggregate_within=row["aggregate_s"] <= bound)
    for row in memory_rows:  # a projection: 32 blocks of weights and uploads; the round's extra once
        row["projected_7b_server_bytes"] = LLAMA_7B_FP32_BYTES + BLOCKS_7B * row["uploads_bytes"] \
            + row["round_extra_bytes"]
    growth = {}
    for name in sorted({r["strategy"] for r in memory_rows}):
        rows = sorted((r for r in memory_rows if r["strategy"] == name), key=itemgetter("clients"))
        first, last = rows[0], rows[-1]
        growth[name] = {"clients": [first["clients"], last["clients"]],
                        "block_peak_rss": last["peak_rss_bytes"] / first["peak_rss_bytes"] - 1,
                        "projected_7b": last["projected_7b_server_bytes"] / first["projected_7b_server_bytes"] - 1,
                        "round_extra_over_7b_weights": last["round_extra_bytes"] / LLAMA_7B_FP32_BYTES}
        growth[name].update({f"{k}_within": growth[name][k] <= ALLOWANCE for k in ("block_peak_rss", "projected_7b")})
    return {"reference_now": ref, "reference_ratio_now_vs_recorded": ref["s"] / current["aggregation_s"],
            "time_within": all(r["aggregate_within"] for r in cells), "memory_growth_7b": growth,
            "memory_e2e_growth": e2e["peak_rss_growth"], "memory_e2e_vs_recorded": e2e["peak_rss_growth"]
            / current["memory_growth"], "memory_e2e_within": e2e["peak_rss_growth"] <= ALLOWANCE}


def format_table(out: dict) -> str:
    """The printed summary: every cell, the memory rows, the verdicts.

    Args:
        out: what :func:`main` returns (before the table is printed).
    """
    s, c, ref = out["summary"], out["current"], out["summary"]["reference_now"]
    lines = [f"Server round per block ({out['settings']['block']}), float32, 1 thread, median of "
             f"{out['settings']['repeats']}; load avg {out['machine']['loadavg_at_start']} -> "
             f"{out['machine']['loadavg_at_end']}",
             f"current figure: aggregate {ref['shape']} K=10 r=16 {c['aggregation_s']:.4f} s "
             f"({c['aggregation_threads']} threads); re-timed now at 1 thread {ref['s']:.4f} s "
             f"(x{s['reference_ratio_now_vs_recorded']:.2f})", ""]
    head = (f"{'strategy':<14}{'r':>3}{'K':>4}{'Kr':>6}{'aggregate':>11}{'apply':>9}{'round s':>10}{'x32 proj.':>11}"
            f"{'bound':>9}{'/bound':>8}{'extra MiB':>10}  ok")
    lines += [head, "-" * len(head)]
    for r in out["cells"]:
        lines.append(f"{r['strategy']:<14}{r['rank']:>3}{r['clients']:>4}{r['inner_rank']:>6}{r['aggregate_s']:>11.4f}"
                     f"{r['apply_s']:>9.4f}{r['round_s']:>10.4f}{r['projected_32_blocks_s']:>11.2f}"
                     f"{r['aggregate_bound_s']:>9.3f}{r['aggregate_vs_bound']:>8.2f}"
                     f"{r['round_extra_bytes'] / MiB:>10.1f}  {'yes' if r['aggregate_within'] else 'NO'}")
    lines += ["", f"memory rows (r={out['settings']['memory_rank']}): K, strategy, uploads MiB, round extra MiB "
              "(RSS; analytic SVD), block peak MiB, projected 7B server GiB"]
    lines += [f"  K={r['clients']:<4}{r['strategy']:<14}" + "".join(f"{v / MiB:>9.1f}" for v in (
        r["uploads_bytes"], r["round_extra_bytes"], r["svd_extra_bytes_analytic"], r["peak_rss_bytes"]))
        + f"{r['projected_7b_server_bytes'] / 2**30:>9.2f}" for r in out["memory_rows"]]
    lines += [f"  {name}: K={g['clients'][0]}->{g['clients'][1]} block peak RSS {100 * g['block_peak_rss']:+.1f}%, "
              f"projected 7B {100 * g['projected_7b']:+.1f}% (projection)" for name, g in s["memory_growth_7b"].items()]
    lines += [f"end to end (systems.memory, tiny Llama): {100 * s['memory_e2e_growth']:+.1f}% vs recorded "
              f"{100 * c['memory_growth']:+.1f}%; within +10%: {s['memory_e2e_within']}",
              f"aggregate within the work-scaled current figure +10% in every cell: {s['time_within']}"]
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    """``server_scaling.png``: seconds per round vs K (and the x32 projection), memory growth vs K.

    Args:
        out: what :func:`main` returns; path: the PNG to write.
    """
    plt, pct = pyplot(), lambda rows, key: [100 * (r[key] / rows[0][key] - 1) for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rank in sorted({(r["strategy"], r["rank"]) for r in out["cells"]}):
        rows = sorted((r for r in out["cells"] if (r["strategy"], r["rank"]) == (name, rank)),
                      key=itemgetter("clients"))
        ks = [r["clients"] for r in rows]
        line, = ax.plot(ks, [r["aggregate_s"] for r in rows], "o-", label=f"{name} r={rank}: aggregate")
        if name == "fedsmoothlora":  # its round also merges into the base; the bound is the aggregate's
            ax.plot(ks, [r["round_s"] for r in rows], "s--", color=line.get_color(), label="  whole round (+ merge)")
            ax.plot(ks, [r["aggregate_bound_s"] for r in rows], ":", color=line.get_color(),
                    label="  current figure x work +10%")
    ax.set(yscale="log", ylabel="server s per round, one block", title=f"server round, block {out['settings']['block']}"
           f", 1 thread, load avg {out['machine']['loadavg_at_start'][0]}-{out['machine']['loadavg_at_end'][0]}")
    ax.secondary_yaxis("right", functions=(lambda y: y * BLOCKS_7B, lambda y: y / BLOCKS_7B)).set_ylabel(
        "projected: 32 blocks (x32)")
    e2e = out["memory_e2e"]["rows"]
    bx.plot([r["clients"] for r in e2e], pct(e2e, "peak_rss_bytes"), "o-", label="whole run, tiny Llama (memory.json)")
    for name in sorted({r["strategy"] for r in out["memory_rows"]}):
        rows = sorted((r for r in out["memory_rows"] if r["strategy"] == name), key=itemgetter("clients"))
        bx.plot([r["clients"] for r in rows], pct(rows, "peak_rss_bytes"), "s-", label=f"{name}: block peak RSS")
        bx.plot([r["clients"] for r in rows], pct(rows, "projected_7b_server_bytes"), "^--",
                label=f"{name}: projected 7B server")
    bx.axhline(100 * ALLOWANCE, color="gray", lw=0.8, ls=":")
    bx.set(ylabel=f"peak memory vs K={e2e[0]['clients']} (%)", title=f"memory, r={out['settings']['memory_rank']}")
    for axis, ks in ((ax, out["settings"]["clients"]), (bx, sorted({r["clients"] for r in e2e + out["memory_rows"]}))):
        axis.set(xscale="log", xlabel="clients K", xticks=ks, xticklabels=[str(k) for k in ks])
        axis.xaxis.set_minor_locator(plt.NullLocator())
        axis.title.set_fontsize(9)
        axis.legend(fontsize=7)
    save(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    """Run the grid, the memory rows and the comparison; write the JSON and the plot; return the results.

    Args:
        argv: command-line arguments (``None``: ``sys.argv``); ``--help`` lists them.
    """
    args = build_parser().parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return {}
    q = args.quick
    items = lambda text, kind=int: [kind(x.strip()) for x in text.split(",") if x.strip()]  # noqa: E731
    clients, ranks = items(args.clients or ("2,4,8" if q else "4,16,64")), items(args.ranks or ("2,4" if q else "8,32"))
    mem_clients = items(args.memory_clients or ("2,8,32" if q else "2,8,32,128"))
    mem_rank, strategies = args.memory_rank or (2 if q else 8), items(args.strategies, str)
    mem_strategies = items(args.memory_strategies or ("fedsmoothlora" if q else args.strategies), str)
    block = BLOCK_QUICK if q else BLOCK_7B
    torch.set_num_threads(1)
    info = {**machine(), "loadavg_at_start": loadavg(), "note": args.note}
    settings = {"block": f"hidden {block[0]}, MLP {block[1]}", "clients": clients, "ranks": ranks,
                "strategies": strategies, "memory_strategies": mem_strategies, "memory_clients": mem_clients,
                "memory_rank": mem_rank, "repeats": args.repeats, "seed": args.seed, "quick": q, "dtype": "float32",
                "threads": 1, "cells": "in this process" if q else "one fresh subprocess each"}
    base = {"block": block, "seed": args.seed, "check": q or block[1] <= 2048}
    ref = reference_cell(block[0], args.repeats, args.seed)
    cells, memory_rows = [], []
    for name, rank, k in itertools.product(strategies, ranks, clients):
        spec = {**base, "strategy": name, "clients": k, "rank": rank, "repeats": args.repeats}
        print(f"[server_scaling] {name} r={rank} K={k} ...", file=sys.stderr, flush=True)
        cells.append(run_cell(spec) if q else cell_in_child(spec))
    for name, k in itertools.product(mem_strategies, mem_clients):
        print(f"[server_scaling] memory {name} K={k} r={mem_rank} ...", file=sys.stderr, flush=True)
        memory_rows.append(cell_in_child({**base, "strategy": name, "clients": k, "rank": mem_rank, "repeats": 1}))
    with tempfile.TemporaryDirectory() as tmp:
        e2e = systems.memory(Path(tmp), smoke=q)
    info["loadavg_at_end"] = loadavg()
    current = current_figures()
    out = {"benchmark": "server_scaling", "settings": settings, "machine": info, "current": current,
           "projection": f"x{BLOCKS_7B}: LLaMA-7B has {BLOCKS_7B} such blocks; seconds are 32 x one block's, "
                         "memory 7B fp32 weights + 32 x one block's uploads + one round extra (not measured)",
           "cells": cells, "memory_rows": memory_rows, "memory_e2e": {k: e2e[k] for k in ("rows", "peak_rss_growth")}}
    out["summary"] = summarize(cells, memory_rows, e2e, ref, current)
    print(format_table(out), flush=True)
    out_path = Path(args.out or RESULTS_DIR / f"server_scaling{'_quick' * q}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    plot_path = out_path.with_suffix(".png") if args.plot is None else (Path(args.plot) if args.plot else None)
    if plot_path:
        plot(out, plot_path)
    print(f"wrote {out_path}" + (f" and {plot_path}" if plot_path else ""))
    return out


if __name__ == "__main__":
    main()
