"""Property tests of partition_dataset on random label distributions: no example lost or duplicated.

tests/data/test_partition.py checks the index-level guarantees of ``partition_indices``;
this file checks what a client actually receives from ``partition_dataset``: the
rows themselves (tracked by a unique ``uid`` column), with their labels intact,
for integer and string labels, the ``labels`` column fallback, and torch formats.
"""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsmooth_hf.data.partition import partition_dataset

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def labelled_datasets(draw):
    """A dataset of 10-300 rows whose labels follow a random, often very skewed, distribution."""
    n = draw(st.integers(10, 300))
    num_classes = draw(st.integers(1, 15))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    probs = rng.dirichlet(np.full(num_classes, draw(st.sampled_from([0.05, 0.5, 5.0]))))
    codes = rng.choice(num_classes, size=n, p=probs)
    as_strings = draw(st.booleans())
    labels = [f"class-{c}" for c in codes] if as_strings else [int(c) for c in codes]
    column = draw(st.sampled_from(["label", "labels"]))
    ds = datasets.Dataset.from_dict({"uid": list(range(n)), column: labels, "group": [int(c) % 5 for c in codes]})
    if draw(st.booleans()):
        ds = ds.with_format("torch", columns=["uid"], output_all_columns=True)
    return ds, column, labels


def _received(clients, column):
    """Every client's rows as (uid, label) pairs, read back through the client datasets."""
    return [list(zip(c.with_format(None)["uid"], c.with_format(None)[column])) for c in clients]


def _assert_no_loss_or_duplicate(rows_per_client, labels, num_clients):
    assert len(rows_per_client) == num_clients
    assert all(len(rows) > 0 for rows in rows_per_client), "a client got no data"
    uids = [uid for rows in rows_per_client for uid, _ in rows]
    assert len(uids) == len(labels) and sorted(uids) == list(range(len(labels))), "examples lost or duplicated"
    for rows in rows_per_client:
        for uid, label in rows:
            assert label == labels[uid], f"example {uid} arrived with label {label!r}, not {labels[uid]!r}"


@SETTINGS
@given(labelled_datasets(), st.integers(1, 10), st.floats(0.05, 10.0), st.integers(0, 2**31 - 1))
def test_dirichlet_clients_receive_every_example_once_with_its_label(case, num_clients, alpha, seed):
    ds, column, labels = case
    try:
        clients = partition_dataset(ds, num_clients, "dirichlet", seed=seed, dirichlet_alpha=alpha)
    except ValueError as err:
        # only the documented refusals: too few examples, or redraws exhausted for a skewed alpha
        assert "num_clients" in str(err) and "dirichlet_alpha" in str(err)
        assert not (alpha >= 1 and len(labels) >= 20 * num_clients)
        return
    rows = _received(clients, column)
    _assert_no_loss_or_duplicate(rows, labels, num_clients)
    assert sum((Counter(label for _, label in r) for r in rows), Counter()) == Counter(labels)
    again = partition_dataset(ds, num_clients, "dirichlet", seed=seed, dirichlet_alpha=alpha)
    assert _received(again, column) == rows, "same seed, same partition"


@SETTINGS
@given(labelled_datasets(), st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_iid_clients_receive_every_example_once_in_balanced_shares(case, num_clients, seed):
    ds, column, labels = case
    if len(labels) < num_clients:
        with pytest.raises(ValueError, match="no examples"):
            partition_dataset(ds, num_clients, "iid", seed=seed)
        return
    rows = _received(partition_dataset(ds, num_clients, "iid", seed=seed), column)
    _assert_no_loss_or_duplicate(rows, labels, num_clients)
    sizes = [len(r) for r in rows]
    assert max(sizes) - min(sizes) <= 1


@SETTINGS
@given(labelled_datasets(), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_column_clients_receive_whole_groups(case, num_clients, seed):
    ds, column, labels = case
    groups = ds.with_format(None)["group"]
    if len(set(groups)) < num_clients:
        with pytest.raises(ValueError, match="partition_column"):
            partition_dataset(ds, num_clients, "column", seed=seed, partition_column="group")
        return
    clients = partition_dataset(ds, num_clients, "column", seed=seed, partition_column="group")
    _assert_no_loss_or_duplicate(_received(clients, column), labels, num_clients)
    owners = {}
    for k, client in enumerate(clients):
        for g in set(client.with_format(None)["group"]):
            assert owners.setdefault(g, k) == k, f"group {g} split across clients {owners[g]} and {k}"
