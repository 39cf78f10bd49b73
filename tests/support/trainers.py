"""The one way tests build a FederatedTrainer: a tiny Llama on the counting task, CPU, no Hub.

Tests say only what differs from these defaults.
"""

from __future__ import annotations

from transformers import TrainingArguments

from fedsmooth_hf import FederatedArguments, FederatedTrainer
from support.tiny import make_counting_dataset, make_tiny_llama

#: TrainingArguments of every test run: small batches, no saving, no bar, no reporting
TRAINING = dict(per_device_train_batch_size=8, learning_rate=5e-3, report_to="none", use_cpu=True,
                disable_tqdm=True, save_strategy="no")
#: FederatedArguments of a small run that every strategy accepts
FEDERATION = dict(num_clients=4, num_rounds=3, local_steps=4, lora_r=4, lora_alpha=8, ga_samples=16, ga_batch_size=8)


def training_args(output_dir, **overrides) -> TrainingArguments:
    return TrainingArguments(output_dir=str(output_dir), **{**TRAINING, **overrides})


def federated_args(**overrides) -> FederatedArguments:
    return FederatedArguments(**{**FEDERATION, **overrides})


def tiny_trainer(output_dir, fed: FederatedArguments | dict | None = None, model=None, train=None,
                 client_datasets=None, eval_dataset=None, **training) -> FederatedTrainer:
    """``fed``: FederatedArguments or overrides of :data:`FEDERATION`; ``train`` defaults to 128
    counting sequences unless ``client_datasets`` are given; ``training``: TrainingArguments overrides."""
    if not isinstance(fed, FederatedArguments):
        fed = federated_args(**(fed or {}))
    if train is None and client_datasets is None:
        train = make_counting_dataset(128)
    return FederatedTrainer(model=model if model is not None else make_tiny_llama(),
                            args=training_args(output_dir, **training), fed_args=fed, train_dataset=train,
                            client_datasets=client_datasets, eval_dataset=eval_dataset)
