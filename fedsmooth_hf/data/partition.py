"""Split one dataset into the private datasets of K simulated federated clients.

A federated simulation starts from a single centralised dataset and hands each
client a disjoint shard of it. How the shards are drawn decides how hard the
federated problem is, so three schemes are offered:

* ``"iid"``: a seeded random permutation cut into near-equal shards, the easy
  baseline in which every client sees the same distribution;
* ``"dirichlet"``: label skew, the standard non-IID benchmark: every class is
  spread over the clients with proportions drawn from ``Dirichlet(alpha)``, so a
  small ``alpha`` gives each client a few dominant labels;
* ``"column"``: natural skew: examples sharing a value of a column (an author,
  a category, a source) stay together on one client, as they would in practice.

All randomness comes from ``np.random.default_rng(seed)``, never from a global
generator, so a partition is reproducible from its seed alone.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from .summary import is_hf_dataset, partition_summary

logger = logging.getLogger(__name__)

__all__ = ["PARTITION_METHODS", "partition_indices", "partition_dataset", "resolve_client_datasets"]

PARTITION_METHODS: tuple[str, ...] = ("iid", "dirichlet", "column")

# Dirichlet draws that leave some client below ``min_size`` are redrawn at most this often.
_MAX_DIRICHLET_ATTEMPTS = 100


def _group_codes(values: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, int]:
    """Map each value to the integer id of its group (ids in sorted or first-seen order).

    Arrays of numbers or strings go through ``np.unique``. Python sequences go
    through a dict, so mixed types (``1`` vs ``"1"``), ``None`` and tuples are
    grouped by equality rather than by whatever ``np.asarray`` would coerce them to.
    """
    if not isinstance(values, (list, tuple)):
        arr = np.asarray(values)
        if arr.ndim == 1 and arr.dtype.kind in "biufUS":
            _, codes = np.unique(arr, return_inverse=True)
            codes = codes.reshape(-1).astype(np.int64)
            return codes, int(codes.max()) + 1 if codes.size else 0
    ids: dict[Hashable, int] = {}
    codes = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, list):
            value = tuple(value)
        try:
            codes[i] = ids.setdefault(value, len(ids))
        except TypeError as err:
            raise ValueError(
                f"partition_indices: value {value!r} at position {i} is not hashable; labels and "
                "partition_column values must be scalars (one label or group per example)"
            ) from err
    return codes, len(ids)


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation cut into shards whose sizes differ by at most one."""
    return [np.asarray(part) for part in np.array_split(rng.permutation(n), num_clients)]


def _dirichlet(
    codes: np.ndarray,
    num_groups: int,
    num_clients: int,
    alpha: float,
    min_size: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Per-class Dirichlet(alpha) proportions over clients, redrawn until every client has ``min_size``."""
    n = codes.size
    if n < num_clients * min_size:
        raise ValueError(
            f"partition_indices: dirichlet cannot give num_clients={num_clients} clients at least "
            f"min_size={min_size} examples each from only {n} examples (dirichlet_alpha={alpha}); "
            "lower num_clients or use more data"
        )
    by_class = [np.flatnonzero(codes == c) for c in range(num_groups)]
    concentration = np.full(num_clients, float(alpha))
    smallest = 0
    for _ in range(_MAX_DIRICHLET_ATTEMPTS):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            members = rng.permutation(members)
            proportions = rng.dirichlet(concentration)
            if not np.all(np.isfinite(proportions)):  # underflow for tiny alpha on old numpy
                proportions = np.zeros(num_clients)
                proportions[rng.integers(num_clients)] = 1.0
            cuts = (np.cumsum(proportions)[:-1] * members.size).astype(np.int64)
            for client, part in enumerate(np.split(members, np.clip(cuts, 0, members.size))):
                shards[client].append(part)
        sizes = [sum(part.size for part in parts) for parts in shards]
        smallest = min(sizes)
        if smallest >= min_size:
            return [np.concatenate(parts) for parts in shards]
    raise ValueError(
        f"partition_indices: {_MAX_DIRICHLET_ATTEMPTS} Dirichlet draws with dirichlet_alpha={alpha} all left "
        f"some of the num_clients={num_clients} clients with fewer than min_size={min_size} examples "
        f"(smallest client in the last draw: {smallest}); raise dirichlet_alpha, lower num_clients or "
        "use more data"
    )


def _column(
    codes: np.ndarray, num_groups: int, num_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Whole groups, largest first, each to the currently smallest client, which keeps sizes balanced."""
    if num_groups < num_clients:
        raise ValueError(
            f"partition_indices: partition_column has {num_groups} distinct values but num_clients="
            f"{num_clients}; every value goes wholly to one client, so at least {num_clients} distinct "
            "values are needed (lower num_clients or pick a finer partition_column)"
        )
    group_sizes = np.bincount(codes, minlength=num_groups)
    # Shuffle first so that equal-size groups are ordered by the seed, then a stable sort by size.
    order = rng.permutation(num_groups)
    order = order[np.argsort(-group_sizes[order], kind="stable")]
    owner = np.empty(num_groups, dtype=np.int64)
    client_sizes = np.zeros(num_clients, dtype=np.int64)
    for group in order:
        client = int(np.argmin(client_sizes))  # ties go to the lowest client id
        owner[group] = client
        client_sizes[client] += group_sizes[group]
    example_owner = owner[codes]
    return [np.flatnonzero(example_owner == client) for client in range(num_clients)]


def partition_indices(
    labels_or_groups: Sequence[Any] | np.ndarray | int,
    num_clients: int,
    method: str,
    seed: int,
    dirichlet_alpha: float = 0.5,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Indices of each client's examples: disjoint, covering ``range(n)``, each sorted ascending.

    ``labels_or_groups`` holds one label (``"dirichlet"``) or group value
    (``"column"``) per example; ``"iid"`` only uses its length, so an ``int`` ``n``
    is accepted too. Raises ``ValueError`` rather than return a client with fewer
    than ``min_size`` examples, since an empty client silently breaks aggregation.
    """
    if method not in PARTITION_METHODS:
        raise ValueError(f"partition_indices: unknown method {method!r}; choose one of {PARTITION_METHODS}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"partition_indices: num_clients must be an integer >= 1, got {num_clients!r}")
    if not (np.isfinite(dirichlet_alpha) and dirichlet_alpha > 0):
        raise ValueError(
            f"partition_indices: dirichlet_alpha must be a finite number > 0, got {dirichlet_alpha!r}"
        )
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ValueError(f"partition_indices: min_size must be an integer >= 1, got {min_size!r}")
    num_clients, min_size = int(num_clients), int(min_size)
    rng = np.random.default_rng(seed)

    if isinstance(labels_or_groups, (int, np.integer)) and not isinstance(labels_or_groups, bool):
        if method != "iid":
            raise ValueError(
                f"partition_indices: method {method!r} needs one label or group value per example, "
                "not just the number of examples"
            )
        n = int(labels_or_groups)
        if n < 0:
            raise ValueError(f"partition_indices: the number of examples must be >= 0, got {n}")
        codes = None
    else:
        n = len(labels_or_groups)
        codes = None if method == "iid" else _group_codes(labels_or_groups)

    if method == "iid":
        clients = _iid(n, num_clients, rng)
    elif method == "dirichlet":
        assert codes is not None
        clients = _dirichlet(codes[0], codes[1], num_clients, float(dirichlet_alpha), min_size, rng)
    else:
        assert codes is not None
        clients = _column(codes[0], codes[1], num_clients, rng)

    clients = [np.sort(part).astype(np.int64, copy=False) for part in clients]
    for k, part in enumerate(clients):
        if part.size == 0:
            raise ValueError(
                f"partition_indices: client {k} would get no examples ({n} examples, num_clients="
                f"{num_clients}, method={method!r}); lower num_clients or use more data"
            )
        if part.size < min_size:
            raise ValueError(
                f"partition_indices: client {k} would get only {part.size} examples, fewer than "
                f"min_size={min_size} ({n} examples, num_clients={num_clients}, method={method!r})"
            )
    return clients


def _read_column(dataset: Any, name: str, argument: str) -> list[Any]:
    """One column as plain Python values, with an error that lists what exists instead."""
    if name not in dataset.column_names:
        raise ValueError(
            f"partition_dataset: {argument}={name!r} is not a column of the dataset; available columns: "
            f"{dataset.column_names}"
        )
    # with_format(None): a torch/numpy format would hand back tensors; list() materialises a lazy Column.
    return list(dataset.with_format(None)[name])


def partition_dataset(
    dataset: Any,
    num_clients: int,
    method: str = "iid",
    seed: int = 0,
    label_column: str = "label",
    partition_column: str | None = None,
    dirichlet_alpha: float = 0.5,
) -> list[Any]:
    """Split ``dataset`` into ``num_clients`` client datasets (see :func:`partition_indices`).

    A ``datasets.Dataset`` comes back as ``Dataset.select`` views, so every client
    keeps the features and format. For ``"iid"`` any sized, indexable dataset
    (a list, a ``torch.utils.data.Dataset``) works and comes back as
    ``torch.utils.data.Subset`` objects.
    """
    if method not in PARTITION_METHODS:
        raise ValueError(f"partition_dataset: unknown method {method!r}; choose one of {PARTITION_METHODS}")
    is_hf = is_hf_dataset(dataset)
    if method == "iid":
        keys: Sequence[Any] | int = len(dataset)
    elif not is_hf:
        raise ValueError(
            f"partition_dataset: method {method!r} reads a column, so it needs a datasets.Dataset; got "
            f"{type(dataset).__name__} (only method='iid' works on plain lists and torch datasets)"
        )
    elif method == "dirichlet":
        column = label_column
        if column not in dataset.column_names and column == "label" and "labels" in dataset.column_names:
            column = "labels"  # the name transformers' Trainer expects
        keys = _read_column(dataset, column, "label_column")
    else:
        if partition_column is None:
            raise ValueError(
                "partition_dataset: method='column' needs partition_column, the column whose values "
                f"define the groups; available columns: {dataset.column_names}"
            )
        keys = _read_column(dataset, partition_column, "partition_column")

    client_indices = partition_indices(keys, num_clients, method, seed, dirichlet_alpha=dirichlet_alpha)
    if is_hf:
        return [dataset.select(idx) for idx in client_indices]
    from torch.utils.data import Subset

    return [Subset(dataset, idx.tolist()) for idx in client_indices]


def resolve_client_datasets(train_dataset, client_datasets: Sequence | None, fed_args, seed: int) -> list:
    """The clients' datasets: ``client_datasets`` as given, or ``train_dataset`` split by ``fed_args``.

    Either way there are ``fed_args.num_clients`` of them and none is empty.
    """
    fa = fed_args
    if client_datasets is not None:
        clients = list(client_datasets)
        if len(clients) != fa.num_clients:
            raise ValueError(
                f"got {len(clients)} client_datasets but FederatedArguments.num_clients={fa.num_clients}"
            )
    elif train_dataset is not None:
        clients = partition_dataset(
            train_dataset,
            fa.num_clients,
            method=fa.partition,
            seed=seed,
            partition_column=fa.partition_column,
            label_column=fa.partition_column or "label",
            dirichlet_alpha=fa.dirichlet_alpha,
        )
        logger.info("client partition (%s):\n%s", fa.partition, partition_summary(clients, fa.partition_column))
    else:
        raise ValueError("FederatedTrainer needs train_dataset (split over clients) or client_datasets")
    for i, ds in enumerate(clients):
        if len(ds) == 0:
            raise ValueError(f"client {i} has no data: every client dataset must hold at least one example")
    return clients


# Beyond this many distinct values a stacked bar is unreadable: the rarest are drawn as one "other" segment.
