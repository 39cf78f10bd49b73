"""The convergence sweeps' figure: eval metric (and loss) per round, one line per strategy or variant."""

from __future__ import annotations

from pathlib import Path

from recipes.plots import plot_metric_by_round, pyplot, save


def plot(runs: list[dict], metric: str, title: str, path: Path) -> Path:
    """Draws one panel per partition and measure: the mean over seeds, shaded from the minimum to the maximum.

    Args:
        runs (`list[dict]`): The sweep's runs (`name`, `partition`, `rounds` with the per-round measures).
        metric (`str`): `"eval_accuracy"` (drawn beside the eval loss) or `"eval_loss"`.
        title (`str`): The figure's title.
        path (`Path`): Where the PNG goes.
    """
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    partitions = list(dict.fromkeys(r["partition"] for r in runs))
    panels = ["eval_accuracy", "eval_loss"] if metric == "eval_accuracy" else ["eval_loss"]
    fig, axes = plt.subplots(len(partitions), len(panels), figsize=(5.2 * len(panels), 3.6 * len(partitions)),
                             squeeze=False)
    names = list(dict.fromkeys(r["name"] for r in runs))
    for i, partition in enumerate(partitions):
        for j, key in enumerate(panels):
            ax = axes[i][j]
            for name in names:
                group = [r for r in runs if r["partition"] == partition and r["name"] == name]
                if group:
                    plot_metric_by_round({name: [[p[key] for p in r["rounds"]] for r in group]},
                                         [p["round"] for p in group[0]["rounds"]], ax,
                                         scale=100.0 if key == "eval_accuracy" else 1.0,
                                         highlight=("fedsmoothlora", "full"), names=names)
            ax.set_xlabel("round (0 = before training)")
            ax.set_ylabel("eval accuracy (%)" if key == "eval_accuracy" else "eval loss")
            ax.set_title(f"{partition}: {key.replace('eval_', 'global ')}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    return save(fig, path, dpi=90)
