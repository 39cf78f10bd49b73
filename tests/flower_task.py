"""The trainer builder the Flower tests federate: a tiny Llama (saved to disk) on the counting task.

Module-level on purpose: Ray actors, ``flwr-clientapp`` processes and client workers
import it by name.
"""

from __future__ import annotations

from support.tiny import make_counting_dataset
from transformers import LlamaForCausalLM, TrainingArguments, set_seed

from fedsmooth_hf import (
    FederatedArguments,
    FederatedCallback,
    FederatedLoraConfig,
    FederatedTrainer,
    FedSmoothLoRAConfig,
)

CONFIG = {
    "strategy": "fedsmoothlora",
    "num-clients": 4,
    "num-rounds": 3,
    "local-steps": 2,
    "num-examples": 64,
}


def federated_arguments(config) -> FederatedArguments:
    ranks = str(config.get("client-ranks", ""))  # e.g. "2,4" (run config values are scalars)
    return FederatedArguments(strategy=str(config["strategy"]), num_clients=int(config["num-clients"]),
                              num_rounds=int(config["num-rounds"]), local_steps=int(config["local-steps"]),
                              lora_r=4, lora_alpha=8, eval_rounds=int(config.get("eval-rounds", 0)),
                              client_eval_fraction=float(config.get("client-eval-fraction", 0.0)),
                              client_ranks=[int(r) for r in ranks.split(",") if r],
                              save_rounds=int(config.get("save-rounds", 0)))


class ServerCrash(RuntimeError):
    """The crash a test injects into the server."""


class CrashAfterClients(FederatedCallback):
    """Kills the server's run once every client of round ``at`` has trained, before that round's merge."""

    def __init__(self, at: int):
        self.at = at

    def on_client_end(self, args, state, control, round, client, metrics, **kwargs):
        if round == self.at:
            raise ServerCrash(f"injected server crash in round {round}, after the clients trained")


def build_trainer(partition_id, config) -> FederatedTrainer:
    """Server (``partition_id=None``) and clients build the same trainer; a client uses its own split."""
    config = {**CONFIG, **config}
    set_seed(7)  # the LoRA init is random: the server's must match the in-process reference run
    args = TrainingArguments(output_dir=str(config["trainer-output-dir"]), per_device_train_batch_size=8,
                             learning_rate=5e-3, report_to="none", use_cpu=True, disable_tqdm=True,
                             save_strategy="no", logging_steps=1, seed=7)
    fed_args = federated_arguments(config)
    peft_config = FederatedLoraConfig(r=fed_args.lora_r, lora_alpha=fed_args.lora_alpha,
                                      fedsmoothlora_config=FedSmoothLoRAConfig(ga_samples=8, ga_batch_size=8))
    trainer = FederatedTrainer(model=LlamaForCausalLM.from_pretrained(str(config["model-path"])), args=args,
                               fed_args=fed_args, peft_config=peft_config,
                               train_dataset=make_counting_dataset(int(config["num-examples"]), with_category=False))
    if partition_id is None and config.get("crash-in-round"):  # the server only
        trainer.add_callback(CrashAfterClients(int(config["crash-in-round"])))
    return trainer
