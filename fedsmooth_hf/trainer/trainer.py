"""FederatedTrainer: a ``transformers.Trainer`` that runs federated LoRA rounds.

Each round samples clients; each client round is a real ``Trainer`` inner loop
(``super().train()``) on that client's data for ``local_steps`` steps, with a fresh
optimizer and scheduler and the user's ``TrainingArguments`` (batch size,
accumulation, precision, logging, callbacks). Around it the trainer only moves
factors: the strategy says where a client starts and what it uploads, the
aggregate is merged into the base. One model lives in memory; per-client state
is LoRA factors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_utils import TrainOutput

from ..data.partition import resolve_client_datasets
from ..engine.callbacks import install_round_callbacks
from ..engine.client_eval import held_out_splits
from ..engine.client_parallel import ClientParallelExecutor
from ..engine.executor import ClientExecutor
from ..engine.local_round import announce_overrides, release_engine, run_local_round
from ..engine.privacy import ClientLevelDP, dp_enabled
from ..engine.result import ClientResult, ClientTrainingError
from ..engine.rounds import (
    RoundEngine,
    describe_federation,
    federation_epoch,
    round_learning_rate,
    sample_clients,
)
from ..engine.sequential import SequentialExecutor
from ..model.adapter import (
    ADAPTER,
    clear_offsets,
    copy_parameters,
    find_target_modules,
    get_lora_factors,
    lora_layers,
    set_lora_factors,
    set_parameters,
)
from ..model.distributed import gathered, is_zero3, world
from ..model.gradients import warn_small_calibration
from ..model.merge import first_non_finite, keep_quantized_layers_differentiable, merge_into_base
from ..model.proximal import ProximalTerm, check_proximal_supported, with_proximal_term
from ..persistence.checkpoint import latest_checkpoint
from ..persistence.model_state import load_round, save_round
from ..strategies import FederatedStrategy, ServerUpdate, strategy_from_options
from .arguments import FederatedArguments, resolve_federated_arguments
from .lora_config import FederatedLoraConfig, add_lora_for_run, resolve_strategy_config

logger = logging.getLogger(__name__)

__all__ = ["FederatedTrainer", "ClientTrainingError", "find_target_modules"]

# FederatedArguments that may change when a run is resumed (everything else must match)
_RESUMABLE_CHANGES = {"num_rounds", "save_rounds", "eval_rounds", "on_client_failure", "client_parallel", "save_dtype"}


class FederatedTrainer(Trainer):
    """``Trainer`` whose ``train()`` runs ``num_rounds`` federated rounds over K clients.

    Args:
        model: a ``PreTrainedModel`` (LoRA is added from ``fed_args``) or a ``peft.PeftModel``
            with a LoRA adapter (its ``LoraConfig`` is used as is).
        args: the user's ``TrainingArguments``; they apply to every local round
            (``max_steps`` is replaced by ``fed_args.local_steps``: see ``fedsmooth_hf.engine.local_round``),
            or a ``FederatedTrainingArguments`` that also carries the federated fields.
        fed_args: :class:`FederatedArguments` (with plain ``TrainingArguments`` only).
        peft_config: the LoRA config to add to a plain ``model`` (a ``peft.LoraConfig``, or a
            :class:`~fedsmooth_hf.FederatedLoraConfig` that also carries FedSmoothLoRA's options);
            default: one built from ``fed_args``' LoRA fields.
        train_dataset: one dataset, split over clients by ``fed_args.partition``; or
        client_datasets: the clients' datasets, already separate (takes precedence).
        init_dataset: the server's own examples for a data-dependent ``peft_config.init_lora_weights`` (LoRA-GA).
        Everything else is passed to ``Trainer`` unchanged.
    """

    def __init__(self, model: PreTrainedModel | nn.Module | None = None, args: TrainingArguments | None = None,
                 fed_args: FederatedArguments | None = None, train_dataset=None,
                 client_datasets: Sequence | None = None, eval_dataset=None, callbacks: list | None = None,
                 peft_config=None, init_dataset=None, **kwargs):
        if model is None:
            raise ValueError("FederatedTrainer needs a model")
        self.fed_args: FederatedArguments = resolve_federated_arguments(args, fed_args)
        fa = self.fed_args
        if args is None:
            args = TrainingArguments(output_dir="fedsmooth_output", report_to="none")
        self.client_datasets = resolve_client_datasets(train_dataset, client_datasets, fa, args.seed)
        self.client_datasets, self.client_eval_datasets = held_out_splits(self.client_datasets, fa, args.seed)
        # an IID split is known only when we made it; user-given clients may be anything
        iid_data = None if client_datasets is not None else fa.partition == "iid"
        model = add_lora_for_run(model, fa, peft_config, args, init_dataset, kwargs.get("data_collator"),
                                 kwargs.get("processing_class"))
        keep_quantized_layers_differentiable(model)
        method_config = resolve_strategy_config(fa.strategy, model.peft_config[ADAPTER], args, fed_args)

        super().__init__(model=model, args=args, train_dataset=self.client_datasets[0], eval_dataset=eval_dataset,
                         callbacks=callbacks, **kwargs)
        self._zero3 = is_zero3(self.accelerator)
        check_proximal_supported(fa.prox_mu, self._zero3)
        self.proximal_term: ProximalTerm | None = None  # live during a local round
        if fa.client_parallel:
            ClientParallelExecutor.check(self)
        self.layers = lora_layers(self.model, ADAPTER)
        options = {**fa.strategy_options(iid_data), "rank": self.lora_rank}
        if method_config is not None:
            options["config"] = method_config
        self.strategy: FederatedStrategy = strategy_from_options(fa.strategy, options)
        logger.info("federated strategy: %s", self.strategy.summary())
        self.strategy.check_layer_shapes({n: (m.out_features, m.in_features) for n, m in self.layers.items()})
        self._extra_names = [n for n, p in self.model.named_parameters() if p.requires_grad and ".lora_" not in n]
        self.strategy.setup(get_lora_factors(self.layers, ADAPTER))
        self.strategy.set_client_ranks(fa.resolved_client_ranks(self.lora_rank))
        self.server_optimizer = fa.make_server_optimizer(self.strategy)
        self.privacy = ClientLevelDP.for_trainer(self) if dp_enabled(fa) else None
        if self.strategy.needs_gradient:
            warn_small_calibration([len(ds) for ds in self.client_datasets], self.strategy.calibration()[0])
        self.round_history: list[dict] = []
        #: (round number, client or None) while a federation runs: every log line carries it
        self.round_context: tuple[int, int | None] | None = None
        self._step_offset = 0
        self._log_history: list[dict] = []
        install_round_callbacks(self.callback_handler, fa, self.client_datasets if client_datasets is None else None)
        announce_overrides(self.args, fa)

    # ------------------------------------------------------------------ construction
    @property
    def lora_rank(self) -> int:
        return int(self.model.peft_config[ADAPTER].r)

    @property
    def client_parallel(self) -> bool:
        """Whether this run trains several clients at once, one per process."""
        return self.fed_args.client_parallel and world()[1] > 1

    @contextlib.contextmanager
    def global_model(self):
        """The current global model for inference (e.g. ``generate``); whole on every rank under ZeRO-3."""
        with self.gathered(modify=True):
            self.load_global_adapter()
        with self.gathered():
            yield self.model

    def gathered(self, modify: bool = False):
        """Whole parameters under ZeRO-3, for the ``with`` block
        (see :func:`fedsmooth_hf.model.distributed.gathered`)."""
        return gathered(self.model, modify) if self._zero3 else contextlib.nullcontext()

    def sample_clients(self, round_idx: int) -> list[int]:
        """Clients of round ``round_idx`` (0-based): a seeded draw that depends only on (seed, round)."""
        return sample_clients(self.fed_args, self.args.seed, round_idx)

    def client_dataset(self, client: int):
        """Client ``client``'s data; a trainer holding one dataset (a federation node) serves it for any id."""
        return self.client_datasets[0 if len(self.client_datasets) == 1 else client]

    def round_learning_rate(self, round_idx: int) -> float:
        return round_learning_rate(self.fed_args, self.args.learning_rate, round_idx)

    def load_global_adapter(self) -> None:
        """The global model: base weights (+ the strategy's global adapter), no offsets."""
        clear_offsets(self.layers)
        glob = self.strategy.global_lora()
        if glob is None:
            glob = {n: (torch.zeros_like(B), A) for n, (B, A) in self.strategy.init_lora.items()}
        set_lora_factors(self.layers, glob, ADAPTER)

    def count_local_steps(self, steps: int) -> None:
        """Add a local round's optimizer steps to the federation's step count (logs, ``trainer_state.json``)."""
        self._step_offset += steps

    def extra_parameters(self) -> dict[str, torch.Tensor]:
        """CPU copies of the fully trained parameters (``modules_to_save``), which are averaged, not factored."""
        return copy_parameters(self.model, self._extra_names)

    # ------------------------------------------------------------------ Trainer hooks
    def is_world_process_zero(self) -> bool:
        """Rank 0 of the real process group, also inside a client-parallel local round."""
        return world()[0] == 0 if self.client_parallel else super().is_world_process_zero()

    def is_local_process_zero(self) -> bool:
        return world()[0] == 0 if self.client_parallel else super().is_local_process_zero()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Every log line carries ``round`` (and ``client`` inside a local round); steps run on."""
        if self.round_context is None:
            return super().log(logs, start_time)
        round_number, client = self.round_context
        logs = {**logs, "round": round_number}
        if client is not None:
            logs["client"] = client
        inner, epoch = self.state.global_step, self.state.epoch
        self.state.global_step = self._step_offset + inner
        self.state.epoch = federation_epoch(self.fed_args, self.state.global_step)  # rounds, not local data passes
        try:
            super().log(logs, start_time)
        finally:
            self.state.global_step, self.state.epoch = inner, epoch
        # Trainer starts a new TrainerState every local round; the run's history lives here.
        self._log_history.append(self.state.log_history[-1])

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.round_context is not None:
            round_number, client = self.round_context
            step = self.state.global_step + 1
            if not torch.isfinite(loss).all():
                raise ClientTrainingError(round_number, client,
                                         f"non-finite training loss ({loss.item()}) at local step {step}")
            # fp16 loss scaling expects inf gradients now and then and skips those steps itself
            if getattr(self.accelerator, "scaler", None) is None:
                grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
                bad = first_non_finite(grads)
                if bad is not None:
                    raise ClientTrainingError(round_number, client,
                                             f"non-finite gradient of '{bad}' at local step {step}")
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss, plus FedProx's proximal term while a local round trains (``proximal.py``)."""
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.proximal_term is None or not model.training:
            return out
        loss = with_proximal_term(self, out[0] if return_outputs else out, num_items_in_batch)
        return (loss, out[1]) if return_outputs else loss

    def evaluate(self, *args, **kwargs):
        """Evaluate the current model, also under DeepSpeed between local rounds (no live engine then):
        on the plain model, whole on every rank (ZeRO-1/2: Trainer would refuse "ZeRO inference"; ZeRO-3: gathered)."""
        if not self.is_deepspeed_enabled:
            return super().evaluate(*args, **kwargs)
        self.is_deepspeed_enabled = False
        try:
            with self.gathered():
                return super().evaluate(*args, **kwargs)
        finally:
            self.is_deepspeed_enabled = True
            release_engine(self)

    def evaluate_global(self, ignore_keys=None) -> dict[str, float]:
        """:meth:`evaluate` the global model (no client's offsets or adapter); numeric metrics only."""
        with self.gathered(modify=True):
            self.load_global_adapter()
        metrics = self.evaluate(ignore_keys=ignore_keys) if self.eval_dataset is not None else {}
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    # ------------------------------------------------------------------ one client, one server step
    def train_client_round(self, round_idx: int, client: int, ignore_keys_for_eval=None,
                           learning_rate: float | None = None, extras: dict | None = None) -> ClientResult:
        """Client ``client``'s local round ``round_idx`` (0-based): gradient estimate, strategy start,
        Trainer inner loop, upload (:func:`~fedsmooth_hf.engine.local_round.run_local_round`). What every
        executor runs, in-process or on a federation node (same seed, same result). ``extras``: the
        global ``modules_to_save`` values to start from."""
        if self.strategy.round != round_idx:  # a node's round: in-process the round loop began it
            self.strategy.begin_round(round_idx)
        outer = self.round_context
        self.round_context = (round_idx + 1, client)
        try:
            if extras is not None:
                with self.gathered(modify=True):
                    set_parameters(self.model, extras)
            lr = self.round_learning_rate(round_idx) if learning_rate is None else learning_rate
            return run_local_round(self, round_idx, client, lr, ignore_keys_for_eval)
        finally:
            self.round_context = outer

    @torch.no_grad()
    def apply_server_update(self, update: ServerUpdate, extras: dict[str, torch.Tensor] | None = None) -> None:
        """Take a round's aggregate: merge it into the base and adopt the server's strategy state.

        How a federation's server and clients keep identical base weights: each applies
        the same broadcast update (the round loop does the same after its own aggregate).
        ``extras`` are the averaged ``modules_to_save`` values.
        """
        with self.gathered(modify=True):
            merge_into_base(self.layers, update.merge, ADAPTER)
            self.strategy.receive_update(update)
            if extras:
                set_parameters(self.model, extras)
            self.load_global_adapter()

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              executor: ClientExecutor | None = None, **kwargs):
        """Run the federated rounds (:class:`~fedsmooth_hf.engine.rounds.RoundEngine`); ``resume_from_checkpoint``
        continues after a saved round; ``executor`` runs each round's clients (default: sequential or
        client-parallel)."""
        start_round = 0
        if resume_from_checkpoint:
            path = latest_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
            if path is None:
                raise ValueError(f"no federated checkpoint (round-<k>/) found in {self.args.output_dir}")
            start_round = self.load_federated_checkpoint(path)
        if executor is None:
            executor = ClientParallelExecutor(self) if self.client_parallel else SequentialExecutor(self)
        t_start = time.perf_counter()
        try:
            done = RoundEngine(self, executor, ignore_keys_for_eval).run(start_round)
        finally:
            self.round_context = None
            self.state.log_history = list(self._log_history)
            describe_federation(self.state, self.fed_args, self._step_offset)  # trainer_state.json: the whole run
        last = next((r for r in reversed(self.round_history) if "train_loss" in r), {})
        metrics = {"train_runtime": time.perf_counter() - t_start, "rounds": done}
        metrics.update({k: v for k, v in last.items() if isinstance(v, float)})
        return TrainOutput(self._step_offset, float(last.get("train_loss", float("nan"))), metrics)

    # ------------------------------------------------------------------ checkpoints
    def save_federated_checkpoint(self, round_number: int) -> Path | None:
        """Write ``output_dir/round-<k>`` (process 0 only); safe against a kill at any point."""
        state = {"fed_args": self.fed_args.to_dict(), "seed": self.args.seed, "strategy": self.strategy.describe(),
                 "round_history": self.round_history, "step_offset": self._step_offset}
        return save_round(self, round_number, state)

    def load_federated_checkpoint(self, path) -> int:
        """Restore a ``round-<k>`` checkpoint (checked before anything changes); returns k, the completed rounds."""
        state = load_round(self, path, _RESUMABLE_CHANGES)
        self.round_history = list(state.get("round_history", []))
        self._step_offset = int(state.get("step_offset", 0))
        if self.privacy is not None:  # the same ledger goes on
            self.privacy.resume(self.round_history)
        with self.gathered(modify=True), torch.no_grad():
            self.load_global_adapter()
        return int(state["round"])

    # ------------------------------------------------------------------ export
    def merged_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The global model's weights under the base architecture's names (LoRA merged)."""
        from ..persistence.hub import merged_state_dict

        with self.gathered():
            return merged_state_dict(self.model, self.layers, self.strategy.global_lora(), ADAPTER, dtype)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the merged global model (a plain ``from_pretrained`` checkpoint), its card and history."""
        from ..persistence.hub import save_merged_model

        output_dir = output_dir or self.args.output_dir
        dtype = None if self.fed_args.save_dtype == "auto" else getattr(torch, self.fed_args.save_dtype)
        with self.gathered():  # collective under ZeRO-3: every rank takes part, rank 0 writes
            if not self.args.should_save:
                return
            save_merged_model(self.model, self.layers, self.strategy.global_lora(), output_dir,
                              self.processing_class, ADAPTER, dtype)
        self.create_model_card(output_dir=output_dir)
        Path(output_dir, "federated_history.json").write_text(
            json.dumps({"fed_args": self.fed_args.to_dict(), "round_history": self.round_history}, indent=1)
        )

    def create_model_card(self, *, output_dir: str | None = None, **card_args) -> None:
        """Write the federated model card (``README.md``), also when an upstream script calls this after training.

        ``card_args`` are ``Trainer.create_model_card``'s (``language``, ``license``, ``tags``,
        ``model_name``, ``finetuned_from``, ``tasks``, ``dataset_tags``, ``dataset``, ``dataset_args``).
        """
        from ..persistence.hub import write_model_card

        if self.is_world_process_zero():
            write_model_card(self, output_dir or self.args.output_dir, **card_args)

    def export_adapter(self, original_model: nn.Module, output_dir: str, rank: int | None = None) -> Path:
        """Save what federated training changed as a PEFT LoRA adapter of rank ``rank`` (default lora_r),
        its config a :class:`FederatedLoraConfig` that records the method's options (plain peft loads it).

        ``original_model`` is the model the run started from, freshly loaded; it is
        wrapped in place. See :func:`fedsmooth_hf.persistence.hub.export_lora_adapter`.
        """
        from ..persistence.hub import export_lora_adapter

        method = getattr(self.strategy, "config", None)
        fields = {f"{self.strategy.name}_config": method} if method is not None else {}
        with self.gathered():
            return export_lora_adapter(self.model, self.layers, self.strategy.global_lora(), original_model,
                                       output_dir, rank or self.lora_rank, ADAPTER, FederatedLoraConfig, fields)

    def push_to_hub(self, commit_message: str | None = "End of federated training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, **kwargs) -> str:
        """Save the merged model with its model card to ``output_dir`` and upload it.

        The repository is ``TrainingArguments.hub_model_id`` (default: the output
        directory's name); ``hub_token`` and ``hub_private_repo`` apply.
        """
        from ..persistence.hub import push_output_dir

        self.save_model(self.args.output_dir)
        if not self.args.should_save:
            return ""
        if kwargs:  # Trainer.push_to_hub passes these on to the model card
            self.create_model_card(**kwargs)
        return push_output_dir(self.args, token, commit_message)
