"""What a partition looks like: a table of each client's size and top labels, and a plot.

Printed and drawn before training (``engine.callbacks``), so a user sees how skewed the
clients are before spending compute on them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

__all__ = ["partition_summary", "plot_partition", "is_hf_dataset"]


def is_hf_dataset(dataset: Any) -> bool:
    """Whether ``dataset`` is a ``datasets.Dataset`` (it has columns to read and ``select``)."""
    import datasets

    return isinstance(dataset, datasets.Dataset)


def _top_shares(counts: Counter, total: int, k: int = 3) -> str:
    if total == 0:
        return "-"
    return " ".join(f"{value}:{100 * count / total:.0f}%" for value, count in counts.most_common(k))


def partition_summary(client_datasets: Sequence[Any], label_column: str | None = None) -> str:
    """A printable table of client sizes and, if ``label_column`` is given, each client's top-3 labels.

    Meant for logs: a glance shows whether a partition is balanced and how skewed
    its label mixes are before any training time is spent on it.
    """
    sizes = [len(client) for client in client_datasets]
    total = sum(sizes)
    label_counts = [_column_counts(client, label_column, "partition_summary") for client in client_datasets]
    show_labels = any(counts is not None for counts in label_counts)

    header = ["client", "size", "share"]
    rows = []
    for k, (size, counts) in enumerate(zip(sizes, label_counts)):
        share = f"{100 * size / total:.1f}%" if total else "-"
        row = [str(k), str(size), share]
        if show_labels:
            row.append(_top_shares(counts, size) if counts is not None else "-")
        rows.append(row)
    totals = ["total", str(total), "100.0%" if total else "-"]
    if show_labels:
        header.append(f"top {label_column}")
        combined: Counter = Counter()
        for counts in label_counts:
            if counts is not None:
                combined.update(counts)
        totals.append(_top_shares(combined, sum(combined.values())))

    table = [header, *rows, totals]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        # Numbers right-aligned, the free-text label column left-aligned.
        cells = [cell.rjust(width) for cell, width in zip(row[:3], widths)]
        if show_labels:
            cells.append(row[3].ljust(widths[3]))
        return "  ".join(cells).rstrip()

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    lines = [fmt(header), rule, *(fmt(row) for row in rows), rule, fmt(totals)]
    return "\n".join(lines)


_MAX_PLOTTED_VALUES = 20


def _column_counts(client: Any, column: str | None, caller: str) -> Counter | None:
    """How often each value of ``column`` occurs in one client; None when the client has no such column."""
    if column is None or not is_hf_dataset(client) or column not in client.column_names:
        return None
    values = list(client.with_format(None)[column])
    if values and not isinstance(values[0], Hashable):
        raise ValueError(f"{caller}: column {column!r} holds {type(values[0]).__name__} values, not labels or "
                         "categories")
    return Counter(values)


def plot_partition(client_datasets: Sequence[Any], column: str | None = "label", path: Any = None,
                   title: str | None = None):
    """A stacked bar per client: how many examples of each ``column`` value it holds.

    The picture of a partition's skew that the printed table only hints at: Dirichlet
    label skew shows as bars of one or two colours, a column split as clients of very
    different heights. Values beyond the 20 most frequent are stacked as ``"other"``.
    Returns the matplotlib ``Figure``; with ``path`` it is also saved there (PNG).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_partition needs matplotlib: pip install matplotlib") from error
    counts = [_column_counts(client, column, "plot_partition") for client in client_datasets]
    counts = [Counter({"all": len(client)}) if c is None else c for c, client in zip(counts, client_datasets)]
    overall: Counter = Counter()
    for c in counts:
        overall.update(c)
    values = [value for value, _ in overall.most_common(_MAX_PLOTTED_VALUES)]
    rest = set(overall) - set(values)
    segments = [(str(value), [c.get(value, 0) for c in counts]) for value in values]
    if rest:
        segments.append((f"other ({len(rest)} values)", [sum(c[v] for v in rest if v in c) for c in counts]))

    clients = np.arange(len(counts))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(counts) + 3), 4.5))
    colours = plt.get_cmap("tab20" if len(segments) > 10 else "tab10")
    bottom = np.zeros(len(counts))
    for i, (label, heights) in enumerate(segments):
        ax.bar(clients, heights, bottom=bottom, label=label, color=colours(i % colours.N), width=0.8)
        bottom += np.asarray(heights, dtype=float)
    ax.set_xticks(clients)
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    ax.set_title(title or f"examples per client by {column or 'client'}")
    if column is not None and len(segments) > 1:
        ax.legend(title=column, fontsize=7, ncol=1 + len(segments) // 12, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
