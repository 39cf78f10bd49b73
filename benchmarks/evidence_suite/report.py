"""The evidence sweeps' report: mean +- std per configuration, rounds and wall time to the reference's final."""

from __future__ import annotations

import json
import statistics

from recipes.plots import plot_metric_by_round, pyplot, save

from .sweep import Sweep, write


def mean_std(values: list[float], scale: float = 1.0) -> str:
    values = [scale * v for v in values]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def reach(run: dict, metric: str, target: float) -> tuple[int | None, float | None]:
    """The first trained round whose ``metric`` is at least as good as ``target``, and the training seconds to it."""
    better = (lambda v: v <= target) if metric.endswith("loss") else (lambda v: v >= target)
    for round_number, value in enumerate(run[metric]):
        if round_number > 0 and better(value):
            return round_number, run["train_wall_s"][round_number]
    return None, None


def summarize(sweep: Sweep, runs: list[dict]) -> list[dict]:
    """One row per configuration with runs: final measure, ROUGE-L, rounds and seconds to the reference's final."""
    final = f"final_{sweep.metric}"
    reference = [r[final] for r in runs if r["strategy"] == sweep.reference]
    target = statistics.mean(reference) if reference else None
    rows = []
    for name in sweep.configs:
        group = [r for r in runs if r["strategy"] == name]
        if not group:
            continue
        hits = [(k, s) for k, s in (reach(r, sweep.metric, target) for r in group) if k is not None] if target else []
        rows.append({
            "strategy": name, "seeds": sorted(r["seed"] for r in group),
            final: [r[final] for r in group],
            "final_eval_loss": [r["final_eval_loss"] for r in group],
            "rouge_l": [r["rouge_l"] for r in group if r.get("rouge_l") is not None],
            "reference_final": target, "reached": len(hits), "of": len(group),
            "rounds_to_reference": statistics.mean(k for k, _ in hits) if hits else None,
            "train_s_to_reference": statistics.mean(s for _, s in hits) if hits else None,
            # medians: one run slowed by another job on the machine should not move the figure
            "wall_s": statistics.median(r["wall_s"] for r in group),
            "cpu_s": statistics.median(r["cpu_s"] for r in group) if all("cpu_s" in r for r in group) else None,
            "reused_from": sorted({r["reused_from"] for r in group if "reused_from" in r}),
        })
    return rows


def markdown(sweep: Sweep, rows: list[dict]) -> str:
    """The report as a markdown table (accuracy in percent)."""
    if not rows:
        return "no runs yet\n"
    final, accuracy = f"final_{sweep.metric}", sweep.metric == "eval_accuracy"
    target = rows[0]["reference_final"]
    shown = f"{100 * target:.2f}%" if accuracy and target is not None else f"{target:.3f}" if target else "-"
    columns = ["strategy", "seeds", f"final {sweep.metric.replace('eval_', 'eval ')}"]
    columns += ["final eval loss"] if accuracy else []
    columns += ["ROUGE-L"] if any(r["rouge_l"] for r in rows) else []
    columns += [f"rounds to {sweep.reference}'s final ({shown})", "training s to it", "s per run (median)"]
    columns += ["CPU s per run (median)"] if all(r["cpu_s"] is not None for r in rows) else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [r["strategy"] + (f" (from {', '.join(r['reused_from'])})" if r["reused_from"] else ""),
                 str(len(r["seeds"])), mean_std(r[final], 100.0 if accuracy else 1.0)]
        cells += [mean_std(r["final_eval_loss"])] if accuracy else []
        cells += [mean_std(r["rouge_l"])] if "ROUGE-L" in columns else []
        cells += [f"{r['rounds_to_reference']:.1f} ({r['reached']}/{r['of']})" if r["reached"]
                  else f"never (0/{r['of']})",
                  f"{r['train_s_to_reference']:.0f}" if r["reached"] else "-", f"{r['wall_s']:.0f}"]
        cells += [f"{r['cpu_s']:.0f}"] if "CPU s per run (median)" in columns else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(sweep: Sweep, title: str) -> list[dict]:
    """Prints the table, writes it as ``<name>.md``, the summary into the JSON and the curves as ``<name>.png``."""
    if not sweep.path.exists():
        raise SystemExit(f"no results at {sweep.path}: run the sweep first")
    own = [r for r in json.loads(sweep.path.read_text())["runs"] if "reused_from" not in r]
    runs = own + sweep.reused()
    rows = summarize(sweep, runs)
    table = markdown(sweep, rows)
    print(table)
    sweep.path.with_suffix(".md").write_text(table)
    write(sweep, own, rows)
    plt = pyplot()
    panels = [sweep.metric] + (["eval_loss"] if sweep.metric != "eval_loss" else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), squeeze=False)
    names = [r["strategy"] for r in rows]
    for ax, key in zip(axes[0], panels):
        for name in names:
            curves = [r[key] for r in runs if r["strategy"] == name]
            plot_metric_by_round({name: curves}, list(range(len(curves[0]))), ax, highlight=("fedsmoothlora",),
                                 names=names, scale=100.0 if key == "eval_accuracy" else 1.0)
        ax.set(xlabel="round (0 = before training)",
               ylabel=f"held-out {key.replace('eval_', '')} (mean over seeds, min..max shaded)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    save(fig, sweep.path.with_suffix(".png"), dpi=100)
    return rows
