"""The evidence sweeps' report: mean +- std per configuration, rounds and wall time to the reference's final loss."""

from __future__ import annotations

import json
import statistics

from recipes.plots import plot_metric_by_round, pyplot, save

from .sweep import Sweep, write


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def reach(run: dict, target: float) -> tuple[int | None, float | None]:
    """The first round whose eval loss is at or below ``target``, and the training wall seconds to it."""
    for round_number, loss in enumerate(run["eval_loss"]):
        if round_number > 0 and loss <= target:
            return round_number, run["train_wall_s"][round_number]
    return None, None


def summarize(sweep: Sweep, runs: list[dict]) -> list[dict]:
    """One row per configuration with runs: final loss, ROUGE-L, rounds and seconds to the reference's final."""
    reference = [r["final_eval_loss"] for r in runs if r["strategy"] == sweep.reference]
    target = statistics.mean(reference) if reference else None
    rows = []
    for name in sweep.configs:
        group = [r for r in runs if r["strategy"] == name]
        if not group:
            continue
        reached = [reach(r, target) for r in group] if target is not None else []
        hits = [(k, s) for k, s in reached if k is not None]
        rows.append({
            "strategy": name, "seeds": sorted(r["seed"] for r in group),
            "final_eval_loss": [r["final_eval_loss"] for r in group],
            "rouge_l": [r["rouge_l"] for r in group if r.get("rouge_l") is not None],
            "reference_final": target, "reached": len(hits), "of": len(group),
            "rounds_to_reference": statistics.mean(k for k, _ in hits) if hits else None,
            "train_s_to_reference": statistics.mean(s for _, s in hits) if hits else None,
            "wall_s": statistics.mean(r["wall_s"] for r in group),
        })
    return rows


def markdown(rows: list[dict], reference: str) -> str:
    target = rows[0]["reference_final"] if rows else None
    head = (f"| strategy | seeds | final eval loss | ROUGE-L | rounds to {reference}'s final "
            f"({target:.3f}) | training s to it | s per run |" if target is not None else "| strategy | seeds |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        rounds = (f"{r['rounds_to_reference']:.1f} ({r['reached']}/{r['of']})" if r["reached"]
                  else f"never (0/{r['of']})")
        seconds = f"{r['train_s_to_reference']:.0f}" if r["reached"] else "-"
        lines.append(f"| {r['strategy']} | {len(r['seeds'])} | {mean_std(r['final_eval_loss'])} | "
                     f"{mean_std(r['rouge_l'])} | {rounds} | {seconds} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def report(sweep: Sweep, title: str) -> list[dict]:
    """Prints the table, writes it as ``<name>.md``, the summary into the JSON and the curves as ``<name>.png``."""
    if not sweep.path.exists():
        raise SystemExit(f"no results at {sweep.path}: run the sweep first")
    runs = json.loads(sweep.path.read_text())["runs"]
    rows = summarize(sweep, runs)
    table = markdown(rows, sweep.reference)
    print(table)
    sweep.path.with_suffix(".md").write_text(table)
    write(sweep, runs, rows)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    names = [r["strategy"] for r in rows]
    for name in names:
        curves = [r["eval_loss"] for r in runs if r["strategy"] == name]
        plot_metric_by_round({name: curves}, list(range(len(curves[0]))), ax, highlight=("fedsmoothlora",),
                             names=names)
    ax.set(xlabel="round (0 = before training)", ylabel="held-out loss (mean over seeds, min..max shaded)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, sweep.path.with_suffix(".png"), dpi=100)
    return rows
