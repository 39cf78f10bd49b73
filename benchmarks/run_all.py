"""Every systems benchmark in one run, with one summary: ``summary.json`` and ``summary.md``.

    python benchmarks/run_all.py --quick     # small shapes, the tiny Llama
    python benchmarks/run_all.py --smoke     # the CI sizes (tests/bench/test_benchmarks_smoke.py)
    python benchmarks/run_all.py             # full sizes (aggregation at LLaMA-7B shapes, SmolLM2 overhead)

Each part measures ours and its baseline side by side and writes its own JSON and PNG:
aggregation (factored vs dense SVD), overhead (federated vs a plain Trainer), ga_cost (the
Gradient-Aligned start, sketched vs dense, vs a plain forward+backward and FedIT client rounds),
communication (upload bytes per strategy vs the model) and memory (peak RSS vs number of clients).
Convergence results (``convergence.py``, far longer) are not re-run here; their headline figures
are added to the summary when their JSON is present.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR  # noqa: E402

# isort: split
from benchmarks import aggregation, ga_cost, overhead, systems  # noqa: E402


def part_args(mode: str, out: Path, threads: int) -> dict[str, list[str]]:
    """Command-line arguments of aggregation.py and overhead.py for each mode.

    Outside the full mode their files get a ``_<mode>`` suffix, so the full-size results that
    docs/benchmarks.md cites are not overwritten by the small sizes.
    """
    agg, ovh = (f"{name}{'' if mode == 'full' else '_' + mode}" for name in ("aggregation", "overhead"))
    agg = ["--out", str(out / f"{agg}.json"), "--plot", str(out / f"{agg}.png"), "--threads", str(threads)]
    ovh = ["--out", str(out / f"{ovh}.json"), "--plot", str(out / f"{ovh}.png"), "--threads", str(threads)]
    if mode == "smoke":
        agg += ["--shapes", "256x256,512x256", "--clients", "4", "--rank", "4", "--repeats", "2",
                "--dense-repeats", "1"]
        ovh += ["--quick", "--clients", "2", "--rounds", "1", "--local_steps", "3"]
    elif mode == "quick":
        agg += ["--quick"]
        ovh += ["--quick"]
    return {"aggregation": agg, "overhead": ovh}


def convergence_headlines(out: Path) -> dict:
    """Final metric and smoothness per strategy of the ViT and NLG sweeps (convergence.py), when present."""
    found = {}
    for path in (out / "convergence_vit.json", out / "convergence_nlg.json"):
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        if data.get("settings", {}).get("quick"):
            continue
        found[path.stem] = {
            partition: {name: {"final": row["final"], "rounds_to_reference": row["rounds_to_reference"],
                               "eval_loss_mean_abs_change": row["eval_loss_mean_abs_change"],
                               "client_loss_jump_mean": row["client_loss_jump_mean"], "seeds": row["seeds"]}
                        for name, row in block["rows"].items()}
            for partition, block in data.get("summary", {}).items()
        }
    return found


def summarize(results: dict, timings: dict, mode: str) -> dict:
    agg, ovh, ga, com, mem = (results[k] for k in ("aggregation", "overhead", "ga_cost", "communication", "memory"))
    return {
        "mode": mode,
        "machine": ovh["machine"] | {"loadavg_at_start": agg["machine"].get("loadavg_at_start")},
        "timings_note": "Ratios are measured side by side in one run; absolute seconds were taken on a shared "
                        "2-core machine under load from other jobs",
        "seconds_per_part": timings,
        "aggregation": [{"shape": r["shape"], "speedup": r["speedup"], "ours_s": r["ours_s"], "dense_s": r["dense_s"],
                         "error_ratio": r["err_ratio"], "optimal": r["optimal"]} for r in agg["results"]],
        "overhead": {"ratio_fedit": ovh["ratio_fedit"], "ratio_fedsmoothlora": ovh["ratio_fedsmoothlora"],
                     "strategy_overhead_share_of_local_training": ovh["strategy_overhead_share_of_local_training"],
                     "total_steps": ovh["settings"]["total_steps"], "model": ovh["settings"]["model"]},
        "ga_cost": ga["headline"],
        "ga_cost_settings": ga["settings"],
        "communication": {name: {"upload_bytes": r["upload_bytes"], "expected_bytes": r["expected_bytes"],
                                 "needed_bytes": r["needed_bytes"], "ratio_to_model": r["ratio_to_model"]}
                          for name, r in com["rows"].items()},
        "communication_model_bytes": next(iter(com["rows"].values()))["model_bytes_fp32"],
        "communication_smollm2_135m": com["smollm2_135m"],
        "memory": {str(r["clients"]): {"peak_rss_bytes": r["peak_rss_bytes"],
                                       "growth_during_run_bytes": r["peak_rss_growth_in_run_bytes"],
                                       "client_state_bytes": r["client_state_bytes"]} for r in mem["rows"]},
        "memory_growth": mem["peak_rss_growth"],
        "memory_flat_within_10pct": mem["flat_within_10pct"],
        "convergence": convergence_headlines(Path(results["out_dir"])),
    }


def to_markdown(s: dict) -> str:
    mib = 2**20
    m = s["machine"]
    lines = [f"# Systems benchmarks ({s['mode']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} thread(s); load average at "
             f"start {m.get('loadavg_at_start')}. {s['timings_note']}.", "",
             "| benchmark | measured | value |", "|---|---|---|"]
    for r in s["aggregation"]:
        lines.append(f"| aggregation {r['shape']} | factored vs dense SVD speedup (ours {r['ours_s']:.4f} s, dense "
                     f"{r['dense_s']:.3f} s) | **{r['speedup']:.0f}x**, error ratio {r['error_ratio']:.6f} |")
    o = s["overhead"]
    lines.append(f"| overhead ({o['model']}, {o['total_steps']} steps) | wall time vs plain Trainer | FedIT "
                 f"**{o['ratio_fedit']:.2f}x**, FedSmoothLoRA **{o['ratio_fedsmoothlora']:.2f}x** |")
    gs, g = s["ga_cost_settings"], s["ga_cost"]
    lines.append(f"| GA start ({gs['model']}, ga_samples={gs['ga_samples']}) | time vs one plain forward+backward "
                 f"over the same samples | sketch **{g['ga_start_sketch_vs_fwd_bwd']:.2f}x**, dense "
                 f"{g['ga_start_dense_vs_fwd_bwd']:.2f}x |")
    lines.append(f"| FedSmoothLoRA client round ({gs['local_steps']} steps x batch {gs['batch']}) | time vs FedIT's | "
                 f"sketch **{g['client_round_sketch_vs_fedit']:.2f}x**, "
                 f"dense {g['client_round_dense_vs_fedit']:.2f}x |")
    lines.append(f"| GA estimate memory | sketches / dense fp32 gradients (own accounting; extra peak RSS) | "
                 f"**{100 * g['memory_fraction_accounted']:.1f}%** ({100 * g['memory_fraction_rss']:.1f}%) |")
    lines.append(f"| GA accuracy | gradient energy of the sketched GA factors vs exact (mean / min over layers) | "
                 f"**{g['functional_mean']:.3f}** / {g['functional_min']:.3f} |")
    full = s["communication_model_bytes"]
    for name, r in s["communication"].items():
        lines.append(f"| upload, {name} | bytes per client per round (expected r(d_in+d_out)x4 per module: "
                     f"{r['expected_bytes']:,d}) | {r['upload_bytes']:,d} B = {100 * r['ratio_to_model']:.2f}% of "
                     f"the {full / mib:.2f} MiB model |")
    smol = s["communication_smollm2_135m"]
    if smol:
        lines.append(f"| upload, SmolLM2-135M r={smol['rank']} (analytic) | bytes per client per round | "
                     f"{smol['upload_bytes'] / mib:.2f} MiB = {100 * smol['ratio']:.2f}% of "
                     f"{smol['model_bytes_fp32'] / mib:.0f} MiB |")
    for k, r in s["memory"].items():
        lines.append(f"| memory, K={k} clients | peak RSS (rise during the run; FedSmoothLoRA client state) | "
                     f"{r['peak_rss_bytes'] / mib:.1f} MiB (+{r['growth_during_run_bytes'] / mib:.1f} MiB; "
                     f"{r['client_state_bytes'] / mib:.2f} MiB) |")
    lines.append(f"| memory growth, K={min(map(int, s['memory']))} -> {max(map(int, s['memory']))} | peak RSS | "
                 f"**{100 * s['memory_growth']:+.1f}%** ({'flat' if s['memory_flat_within_10pct'] else 'NOT flat'}"
                 f" within 10%) |")
    lines += ["", "Seconds per part (under load): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds_per_part"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes")
    mode.add_argument("--smoke", action="store_true", help="CI sizes")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    a = p.parse_args(argv)
    name = "smoke" if a.smoke else "quick" if a.quick else "full"
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = part_args(name, out, a.threads)
    results, timings = {"out_dir": str(out)}, {}
    t_all = time.perf_counter()
    parts = [("aggregation", lambda: aggregation.main(args["aggregation"])),
             ("overhead", lambda: overhead.main(args["overhead"])),
             ("ga_cost", lambda: ga_cost.main((["--smoke"] if name != "full" else []) + ["--out-dir", str(out)])),
             ("communication", lambda: systems.communication(out, smoke=a.smoke)),
             ("memory", lambda: systems.memory(out, smoke=a.smoke))]
    for part, run in parts:
        print(f"[run_all] {part} ...", flush=True)
        t0 = time.perf_counter()
        results[part] = run()
        timings[part] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    summary = summarize(results, timings, name)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(to_markdown(summary))
    print(to_markdown(summary))
    print(f"[run_all] wrote {out / 'summary.json'} and {out / 'summary.md'} ({timings['total']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
