"""plot_partition: one stacked bar per client whose height is the client's size."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from fedsmooth_hf.data.partition import partition_dataset
from fedsmooth_hf.data.summary import plot_partition


def _bars_by_client(fig) -> dict[float, float]:
    """Total stacked height at each client's x position, read back from the drawn bars."""
    totals: dict[float, float] = {}
    for patch in fig.axes[0].patches:
        x = round(patch.get_x() + patch.get_width() / 2, 6)
        totals[x] = totals.get(x, 0.0) + patch.get_height()
    return totals


@pytest.mark.parametrize("num_labels", [3, 30])  # 30 > the plotted maximum: the rest stacks as "other"
def test_one_bar_per_client_and_heights_are_client_sizes(tmp_path, num_labels):
    rng = np.random.default_rng(0)
    data = datasets.Dataset.from_dict({"x": list(range(600)), "label": rng.integers(0, num_labels, 600).tolist()})
    clients = partition_dataset(data, 7, method="dirichlet", seed=1, dirichlet_alpha=0.3)
    path = tmp_path / "partition.png"
    fig = plot_partition(clients, "label", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    totals = _bars_by_client(fig)
    assert sorted(totals) == list(range(7))
    assert [totals[k] for k in range(7)] == [len(c) for c in clients]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(legend) == min(num_labels, 20) + (num_labels > 20)
    assert legend[-1].startswith("other") == (num_labels > 20)


def test_without_the_column_each_bar_is_the_client_size():
    clients = [list(range(n)) for n in (5, 9, 2)]  # plain lists: no column to read
    totals = _bars_by_client(plot_partition(clients, None))
    assert [totals[k] for k in range(3)] == [5, 9, 2]


def test_trainer_saves_partition_png_of_its_split(tmp_path):
    from support.tiny import make_counting_dataset, make_tiny_llama
    from transformers import TrainingArguments

    from fedsmooth_hf import FederatedArguments, FederatedTrainer

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none",
                             use_cpu=True, disable_tqdm=True, save_strategy="no")
    fed = FederatedArguments(num_clients=3, num_rounds=1, local_steps=1, lora_r=2, lora_alpha=4, strategy="fedit",
                             partition="column", partition_column="category", eval_rounds=0)
    trainer = FederatedTrainer(model=make_tiny_llama(), args=args, fed_args=fed,
                               train_dataset=make_counting_dataset(24))
    trainer.train()
    assert (tmp_path / "partition.png").read_bytes()[:4] == b"\x89PNG"
