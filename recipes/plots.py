"""The plots every recipe and benchmark draws: one matplotlib setup (file-only, no display) and shared figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """Returns `matplotlib.pyplot` on the file-only Agg backend (recipes and benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, dpi: int = 120) -> Path:
    """Writes `fig` to `path` (its folder created), closes it and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) label pairs.

    Args:
        labels (`np.ndarray`): True label ids.
        predictions (`np.ndarray`): Predicted label ids, one per label.
        num_classes (`int`): Number of classes.

    Returns:
        `np.ndarray` of shape `(num_classes, num_classes)`: `counts[true, predicted]`.
    """
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes**2)
    return flat.reshape(num_classes, num_classes)


def plot_confusion_matrix(cm: np.ndarray, class_names: list[str], path: str | Path, title: str) -> Path:
    """Draws a confusion matrix as a heat map, with the counts written in when there are at most 30 classes.

    Args:
        cm (`np.ndarray`): `counts[true, predicted]`, as from [`confusion_matrix`].
        class_names (`list[str]`): Names in label-id order.
        path (`str` or `Path`): Where the PNG goes.
        title (`str`): The figure's title.
    """
    plt = pyplot()
    n = len(class_names)
    size = max(5.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > threshold else "black")
    return save(fig, path)


def plot_accuracy_by_round(history: list[dict], chance: float, path: str | Path, title: str) -> Path:
    """Draws the global model's accuracy per round; with per-client evaluation also the clients' mean and worst.

    Args:
        history (`list[dict]`): A trainer's `round_history` (rounds without `eval_accuracy` are skipped).
        chance (`float`): Accuracy of a uniform guess, drawn as a dashed line.
        path (`str` or `Path`): Where the PNG goes.
        title (`str`): The figure's title.
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    points = [(r["round"], r["eval_accuracy"]) for r in history if "eval_accuracy" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        ax.plot(*zip(*points), marker="o", label="global model")
    for key, label, style in (("client_eval_accuracy_mean", "clients' held-out splits: mean", "-"),
                              ("client_eval_accuracy_worst", "clients' held-out splits: worst client", ":")):
        client_points = [(r["round"], r[key]) for r in history if key in r]  # with --client_eval_fraction
        if client_points:
            ax.plot(*zip(*client_points), linestyle=style, marker=".", label=label)
    ax.axhline(chance, color="gray", linestyle="--", label=f"chance ({chance:.2f})")
    ax.set_xlabel("round (0 = before federated training)")
    ax.set_ylabel("eval accuracy")
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def plot_metric_by_round(series: dict[str, list[list[float]]], rounds: list[int], ax, scale: float = 1.0,
                         highlight: tuple[str, ...] = (), names: list[str] | None = None) -> None:
    """Draws one line per method on `ax`: the mean over seeds, shaded from the minimum to the maximum.

    Args:
        series (`dict[str, list[list[float]]]`): Method name -> one list of per-round values per seed.
        rounds (`list[int]`): The round of each value.
        ax (`matplotlib.axes.Axes`): Where to draw.
        scale (`float`, *optional*, defaults to 1.0): Factor applied to every value (100 for percent).
        highlight (`tuple[str, ...]`, *optional*): Name prefixes drawn with a thicker line.
        names (`list[str]`, *optional*): Every method of the figure, so a method keeps its colour in every
            panel even where another is missing; defaults to the keys of `series`.
    """
    colors = pyplot().get_cmap("tab10")
    names = list(series) if names is None else names
    for name, values in series.items():
        color = colors(names.index(name) % 10)
        values = scale * np.asarray(values, dtype=float)
        style = {"linewidth": 2.2} if highlight and name.startswith(highlight) else {}
        ax.plot(rounds, values.mean(0), color=color, label=f"{name} (n={len(values)})", **style)
        if len(values) > 1:
            ax.fill_between(rounds, values.min(0), values.max(0), color=color, alpha=0.15)
