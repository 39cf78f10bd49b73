"""The convergence sweeps' figures: per-run measures, the summary over seeds and its tables.

* final metric, mean +- std over seeds, and the mean of the last quarter of rounds;
* rounds (and training seconds) to reach the reference's final metric (FedIT's mean over seeds);
* smoothness: mean |eval_loss[t] - eval_loss[t-1]| over rounds t >= 2 (the first round's
  large drop is left out), and the number of rounds in which accuracy fell;
* inter-round client loss jump: a client's first training loss in a round minus its last
  training loss in its previous participation (signed mean and mean of the absolute value).
"""

from __future__ import annotations

import math
import statistics

from benchmarks.convergence_suite.settings import REFERENCE


def client_loss_jumps(traces: list[dict]) -> list[float]:
    """first loss of a client round minus the same client's last loss in its previous round."""
    last_loss: dict[int, float] = {}
    jumps = []
    for trace in sorted(traces, key=lambda t: t["round"]):
        client = trace["client"]
        if client in last_loss:
            jumps.append(trace["losses"][0] - last_loss[client])
        last_loss[client] = trace["losses"][-1]
    return jumps


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_metrics(run: dict, metric: str) -> dict:
    """Per-run figures: final metric, smoothness of the eval loss, accuracy drops, client loss jumps."""
    series = [r[metric] for r in run["rounds"]]
    losses = [r["eval_loss"] for r in run["rounds"]]
    tv = [abs(b - a) for a, b in zip(losses[1:], losses[2:])]  # rounds t >= 2
    jumps = client_loss_jumps(run["client_traces"])
    out = {
        "final": series[-1],
        # a non-IID global curve jumps from round to round: the last quarter's mean ranks methods more stably
        "last_quarter": statistics.fmean(series[-max(1, (len(series) - 1) // 4):]),
        "final_eval_loss": losses[-1],
        "eval_loss_mean_abs_change": statistics.fmean(tv) if tv else float("nan"),
        "client_loss_jump_mean": statistics.fmean(jumps) if jumps else float("nan"),
        "client_loss_jump_mean_abs": statistics.fmean(abs(j) for j in jumps) if jumps else float("nan"),
    }
    if metric == "eval_accuracy":
        out["accuracy_drops"] = sum(b < a for a, b in zip(series[1:], series[2:]))
    return out


def rounds_to_reach(series: list[dict], metric: str, target: float) -> int | None:
    higher_is_better = metric != "eval_loss"
    for r in series:
        value = r[metric]
        if (value >= target) if higher_is_better else (value <= target):
            return r["round"]
    return None


def seconds_to_reach(series: list[dict], round_reached: int | None) -> float | None:
    """Training wall time (evaluations left out) until the end of ``round_reached``; None if not recorded."""
    if round_reached is None:
        return None
    return next((r.get("train_wall_s") for r in series if r["round"] == round_reached), None)


def summarize(runs: list[dict], metric: str) -> dict:
    """Per partition and strategy/variant: mean +- std over seeds of every run figure, and rounds to FedIT."""
    summary: dict = {}
    for run in runs:
        summary.setdefault(run["partition"], {}).setdefault(run["name"], []).append(run)
    out = {}
    for partition, by_name in summary.items():
        reference = by_name.get(REFERENCE) or by_name.get(next(iter(by_name)))
        target = statistics.fmean(r["rounds"][-1][metric] for r in reference)
        rows = {}
        for name, group in by_name.items():
            per_run = [run_metrics(r, metric) for r in group]
            row = {"seeds": [r["seed"] for r in group]}
            for key in per_run[0]:
                mean, std = _mean_std([m[key] for m in per_run])
                row[key] = {"mean": mean, "std": std}
            reached = [rounds_to_reach(r["rounds"], metric, target) for r in group]
            row["rounds_to_reference"] = {"per_seed": reached, "target": target,
                                          "mean_of_reached": _mean_std([x for x in reached if x is not None])[0],
                                          "reached": sum(x is not None for x in reached), "of": len(reached)}
            seconds = [seconds_to_reach(r["rounds"], k) for r, k in zip(group, reached)]
            row["train_s_to_reference"] = _mean_std([s for s in seconds if s is not None])[0]
            row["wall_s_mean"] = statistics.fmean(r["wall_s"] for r in group)
            rows[name] = row
        out[partition] = {"reference": REFERENCE if REFERENCE in by_name else next(iter(by_name)),
                          "reference_final": target, "rows": rows}
    return out


def format_table(summary: dict, metric: str) -> str:
    lines = []
    fmt = (lambda v: f"{100 * v:.2f}") if metric == "eval_accuracy" else (lambda v: f"{v:.4f}")
    for partition, block in summary.items():
        label = "accuracy %" if metric == "eval_accuracy" else "eval loss"
        lines.append(f"[{partition}] reference: {block['reference']} final {label} {fmt(block['reference_final'])}")
        head = (f"{'strategy':<40}{'final ' + label:>20}{'rounds to ref':>15}{'|dLoss| t>=2':>16}"
                f"{'client jump':>14}{'|jump|':>10}{'s/run':>8}")
        lines += [head, "-" * len(head)]
        for name, row in block["rows"].items():
            rr = row["rounds_to_reference"]
            reach = (f"{rr['mean_of_reached']:.1f} ({rr['reached']}/{rr['of']})" if rr["reached"]
                     else f"- (0/{rr['of']})")
            final = f"{fmt(row['final']['mean'])} +- {fmt(row['final']['std'])}"
            lines.append(f"{name:<40}{final:>20}{reach:>15}{row['eval_loss_mean_abs_change']['mean']:>16.4f}"
                         f"{row['client_loss_jump_mean']['mean']:>14.4f}"
                         f"{row['client_loss_jump_mean_abs']['mean']:>10.4f}"
                         f"{row['wall_s_mean']:>8.0f}")
        lines.append("")
    return "\n".join(lines)


def format_markdown(summary: dict, metric: str) -> str:
    """The summary as markdown tables (pasted into docs/benchmarks.md)."""
    acc = metric == "eval_accuracy"
    fmt = (lambda v: f"{100 * v:.1f}") if acc else (lambda v: f"{v:.3f}")
    label = "final accuracy %" if acc else "final eval loss"
    lines = []
    for partition, block in summary.items():
        lines += [f"**{partition}** (reference: {block['reference']}, final {fmt(block['reference_final'])})", "",
                  f"| strategy | seeds | {label} | mean of the last quarter of rounds | rounds to reference (reached) "
                  f"| training s to reference | mean abs eval-loss change, t>=2 |"
                  + (" accuracy drops |" if acc else "") + " client loss jump (signed / abs) | s per run |",
                  "|---|---|---|---|---|---|---|" + ("---|" if acc else "") + "---|---|"]
        for name, row in block["rows"].items():
            rr = row["rounds_to_reference"]
            reach = (f"{rr['mean_of_reached']:.1f} ({rr['reached']}/{rr['of']})" if rr["reached"]
                     else f"never (0/{rr['of']})")
            drops = f" {row['accuracy_drops']['mean']:.1f} |" if acc else ""
            to_ref = row["train_s_to_reference"]
            to_ref = f"{to_ref:.0f}" if math.isfinite(to_ref) else "—"
            lines.append(f"| {name} | {len(row['seeds'])} | {fmt(row['final']['mean'])} ± {fmt(row['final']['std'])} "
                         f"| {fmt(row['last_quarter']['mean'])} ± {fmt(row['last_quarter']['std'])} "
                         f"| {reach} | {to_ref} "
                         f"| {row['eval_loss_mean_abs_change']['mean']:.4f} |{drops} "
                         f"{row['client_loss_jump_mean']['mean']:+.3f} / "
                         f"{row['client_loss_jump_mean_abs']['mean']:.3f} "
                         f"| {row['wall_s_mean']:.0f} |")
        lines.append("")
    return "\n".join(lines)
