"""Per-client evaluation: how the one global model serves each client's own data.

A global eval set shows the average client; federated users also need the worst one
(a client whose data the global model fits badly is the one that leaves). With
``client_eval_fraction > 0`` a seeded share of every client's data is held out before
training, never trained on, and at every evaluation round the global model is scored
on each client's held-out split. The round record gets each client's metrics and their
mean, std and worst value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# A metric whose name contains one of these is better when lower (the worst client has the highest).
_LOWER_IS_BETTER = ("loss", "perplexity", "error", "wer", "cer")
# Trainer.evaluate's timings: not a property of the client's data (and not reproducible)
_TIMINGS = ("_runtime", "_per_second", "_preparation_time")


def held_out_indices(size: int, fraction: float, seed: int, client: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held_out)`` row indices of one client: a seeded ``fraction`` (at least one row) held out.

    The generator depends on ``(seed, client)`` only, so a client's split is the same in
    every process of a federation and does not move when other clients change.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"client_eval_fraction must lie in (0, 1), got {fraction}")
    if size < 2:
        raise ValueError(f"client {client} has {size} example(s): holding out an evaluation split needs at least 2")
    count = min(size - 1, max(1, round(fraction * size)))
    order = np.random.default_rng([seed, client]).permutation(size)
    return np.sort(order[count:]), np.sort(order[:count])


def split_for_evaluation(dataset: Any, fraction: float, seed: int, client: int) -> tuple[Any, Any]:
    """The client's training part and its held-out part (``Dataset.select`` views or ``Subset``s)."""
    train, held = held_out_indices(len(dataset), fraction, seed, client)
    if hasattr(dataset, "select"):
        return dataset.select(train), dataset.select(held)
    from torch.utils.data import Subset

    return Subset(dataset, train.tolist()), Subset(dataset, held.tolist())


def summarize_client_metrics(per_client: Mapping[int, Mapping[str, float]], prefix: str = "client_eval") -> dict:
    """Per metric: every client's value, the mean, the (population) std and the worst client.

    Returns flat keys for logs and round records: ``<prefix>_<metric>_{mean,std,worst}``,
    ``<prefix>_<metric>_worst_client`` and ``<prefix>`` = ``{client: {metric: value}}``.
    """
    out: dict[str, Any] = {prefix: {str(c): dict(m) for c, m in per_client.items()}}
    names: Sequence[str] = sorted({k for m in per_client.values() for k, v in m.items() if _is_number(v)})
    for name in names:
        values = {c: float(m[name]) for c, m in per_client.items() if name in m and _is_number(m[name])}
        pick = max if any(word in name for word in _LOWER_IS_BETTER) else min
        worst = pick(values, key=values.get)
        mean = sum(values.values()) / len(values)
        out[f"{prefix}_{name}_mean"] = mean
        out[f"{prefix}_{name}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values.values()) / len(values))
        out[f"{prefix}_{name}_worst"] = values[worst]
        out[f"{prefix}_{name}_worst_client"] = worst
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def held_out_splits(client_datasets: Sequence[Any], fed_args, seed: int) -> tuple[list, list | None]:
    """``(training parts, held-out parts)`` of every client; ``(client_datasets, None)`` when off."""
    if fed_args.client_eval_fraction <= 0:
        return list(client_datasets), None
    splits = [split_for_evaluation(ds, fed_args.client_eval_fraction, seed, c) for c, ds in enumerate(client_datasets)]
    return [train for train, _ in splits], [held for _, held in splits]


def evaluate_client(trainer, held_out: Any, ignore_keys=None) -> dict[str, float]:
    """``trainer``'s current model on one client's held-out split: its numeric metrics, no ``eval_`` prefix.

    What a federation node runs on its own split (it sends back only these numbers)."""
    metrics = trainer.evaluate(eval_dataset=held_out, ignore_keys=ignore_keys, metric_key_prefix="eval")
    return {k.removeprefix("eval_"): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not k.endswith(_TIMINGS) and k != "epoch"}


def report_client_metrics(trainer, per_client: Mapping[int, Mapping[str, float]]) -> dict:
    """Summarize every client's metrics (:func:`summarize_client_metrics`) and log the summary."""
    summary = summarize_client_metrics(per_client)
    trainer.log({k: v for k, v in summary.items() if isinstance(v, float)})
    return summary


def evaluate_clients(trainer, held_out: Sequence[Any], ignore_keys=None) -> dict:
    """``trainer``'s current model on every client's held-out split: per-client metrics, mean, std, worst."""
    return report_client_metrics(trainer, {client: evaluate_client(trainer, held, ignore_keys)
                                           for client, held in enumerate(held_out)})
