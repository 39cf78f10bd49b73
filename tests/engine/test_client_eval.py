"""Per-client evaluation: held-out rows are never trained on, and the metrics are the model's on each split."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from support.tiny import make_counting_dataset, make_tiny_llama
from transformers import TrainingArguments

from fedsmooth_hf import FederatedArguments, FederatedTrainer
from fedsmooth_hf.engine.client_eval import held_out_indices, summarize_client_metrics


def test_held_out_indices_cover_the_client_once_and_depend_on_seed_and_client_only():
    train, held = held_out_indices(50, 0.2, seed=3, client=1)
    assert len(held) == 10 and len(train) == 40
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(50))
    again = held_out_indices(50, 0.2, seed=3, client=1)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(held_out_indices(50, 0.2, seed=3, client=2)[1], held)
    assert len(held_out_indices(3, 0.01, 0, 0)[1]) == 1  # at least one row held out
    assert len(held_out_indices(3, 0.9, 0, 0)[0]) == 1  # at least one row trained on
    with pytest.raises(ValueError, match="client 4 has 1 example"):
        held_out_indices(1, 0.5, 0, 4)


def test_summary_worst_is_highest_loss_and_lowest_accuracy():
    summary = summarize_client_metrics({0: {"loss": 1.0, "accuracy": 0.9}, 1: {"loss": 3.0, "accuracy": 0.5},
                                        2: {"loss": 2.0, "accuracy": 0.7}})
    assert summary["client_eval_loss_worst"] == 3.0 and summary["client_eval_loss_worst_client"] == 1
    assert summary["client_eval_accuracy_worst"] == 0.5 and summary["client_eval_accuracy_worst_client"] == 1
    assert summary["client_eval_loss_mean"] == pytest.approx(2.0)
    assert summary["client_eval_loss_std"] == pytest.approx(np.std([1.0, 3.0, 2.0]))
    assert summary["client_eval"]["2"] == {"loss": 2.0, "accuracy": 0.7}


def _unique_rows(n: int = 48, seq_len: int = 8) -> datasets.Dataset:
    """Row i starts with token i: a training batch's first column names the rows it holds."""
    ids = [[(i + k) % 64 for k in range(seq_len)] for i in range(n)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})




def test_held_out_rows_never_train_and_metrics_equal_direct_evaluation(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=5e-3,
                             report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no")
    fed = FederatedArguments(num_clients=3, num_rounds=2, local_steps=3, lora_r=2, lora_alpha=4, strategy="fedit",
                             client_eval_fraction=0.25)
    trainer = FederatedTrainer(model=make_tiny_llama(), args=args, fed_args=fed, train_dataset=_unique_rows(),
                               eval_dataset=make_counting_dataset(8, seed=1))
    trained_rows: set[int] = set()
    step = trainer.training_step

    def spy(model, inputs, num_items_in_batch=None):
        trained_rows.update(inputs["input_ids"][:, 0].tolist())
        return step(model, inputs, num_items_in_batch)

    trainer.training_step = spy
    trainer.train()
    held_rows = {row[0] for held in trainer.client_eval_datasets for row in held["input_ids"]}
    assert len(held_rows) == sum(len(h) for h in trainer.client_eval_datasets) > 0
    assert trained_rows and not trained_rows & held_rows
    assert sum(len(c) for c in trainer.client_datasets) + len(held_rows) == 48

    last = trainer.round_history[-1]
    assert set(last["client_eval"]) == {"0", "1", "2"} and "eval_loss" in last
    for client, held in enumerate(trainer.client_eval_datasets):
        direct = trainer.evaluate(eval_dataset=held)["eval_loss"]
        assert last["client_eval"][str(client)]["loss"] == pytest.approx(direct, rel=1e-6)
    losses = [last["client_eval"][c]["loss"] for c in ("0", "1", "2")]
    assert last["client_eval_loss_worst"] == max(losses)
    assert last["client_eval_loss_mean"] == pytest.approx(sum(losses) / 3)


def test_bad_fraction_is_named():
    with pytest.raises(ValueError, match="client_eval_fraction"):
        FederatedArguments(client_eval_fraction=1.0)
