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
import gc
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, TrainOutput

from .arguments import FederatedArguments
from .callbacks import ROUND_EVENTS, FederatedCallback, FederatedProgressCallback
from .checkpoint import (
    check_model_tensors,
    check_resumable,
    check_strategy_tensors,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from .distributed import all_gather_objects, gathered, is_zero3, single_process_view, world
from .gradients import estimate_gradient_subspaces
from .lora_init import (
    apply_client_start,
    clear_offsets,
    get_lora_factors,
    lora_layers,
    set_lora_factors,
    set_offsets,
)
from .lowrank import factored_norm
from .merge import (
    base_residual,
    ensure_base_residual,
    first_non_finite,
    is_quantized,
    keep_quantized_layers_differentiable,
    keeps_residual,
    merge_into_base,
)
from .partition import partition_dataset, partition_summary, plot_partition
from .client_eval import split_for_evaluation, summarize_client_metrics
from .client_rank import RankMask, pad_factors, resolve_client_ranks, truncate_factors
from .proximal import ProximalTerm
from .strategies import FederatedStrategy, ServerUpdate, strategy_from_options

logger = logging.getLogger(__name__)

__all__ = ["FederatedTrainer", "ClientTrainingError", "find_target_modules"]

ADAPTER = "default"
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "head")
# FederatedArguments that may change when a run is resumed (everything else must match)
_RESUMABLE_CHANGES = {"num_rounds", "save_rounds", "eval_rounds", "on_client_failure", "client_parallel"}


class ClientTrainingError(RuntimeError):
    """A client's local round failed (exception or non-finite loss/upload); ``client`` is None for the round."""

    def __init__(self, round_number: int, client: int | None, reason: str):
        where = f"round {round_number}" if client is None else f"round {round_number}, client {client}"
        super().__init__(f"{where}: {reason}")
        self.round_number = round_number
        self.client = client
        self.reason = reason

    def __reduce__(self):  # client-parallel rounds send failures between processes
        return type(self), (self.round_number, self.client, self.reason)


def find_target_modules(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Names of every ``nn.Linear`` except the output head, found by type (not by name patterns).

    The head is the model's output embeddings, any top-level head named like
    ``lm_head``/``classifier``/``score``, and anything listed in ``exclude``.
    """
    head_ids = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        head_ids.add(id(out))
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in head_ids:
            continue
        last = name.rsplit(".", 1)[-1]
        if name in _HEAD_NAMES or last in exclude or any(name == h or name.startswith(f"{h}.") for h in exclude):
            continue
        names.append(name)
    return names


def _client_round_seed(seed: int, round_idx: int, client: int) -> int:
    """A seed that depends only on (seed, round, client): resumable and order-independent."""
    return int(np.random.SeedSequence([seed, round_idx, client]).generate_state(1)[0])


class FederatedTrainer(Trainer):
    """``Trainer`` whose ``train()`` runs ``num_rounds`` federated rounds over K clients.

    Args:
        model: a ``PreTrainedModel`` (LoRA is added from ``fed_args``) or a ``peft.PeftModel``
            with a LoRA adapter (its ``LoraConfig`` is used as is).
        args: the user's ``TrainingArguments``; they apply to every local round
            (``max_steps`` is replaced by ``fed_args.local_steps``).
        fed_args: :class:`FederatedArguments`.
        train_dataset: one dataset, split over clients by ``fed_args.partition``; or
        client_datasets: the clients' datasets, already separate (takes precedence).
        Everything else is passed to ``Trainer`` unchanged.
    """

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        args: TrainingArguments | None = None,
        fed_args: FederatedArguments | None = None,
        train_dataset=None,
        client_datasets: Sequence | None = None,
        eval_dataset=None,
        callbacks: list | None = None,
        **kwargs,
    ):
        if model is None:
            raise ValueError("FederatedTrainer needs a model")
        self.fed_args = fed_args if fed_args is not None else FederatedArguments()
        fa = self.fed_args
        if args is None:
            args = TrainingArguments(output_dir="fedsmooth_output", report_to="none")
        self.client_datasets = self._resolve_clients(train_dataset, client_datasets, args.seed)
        self._partitioned = client_datasets is None  # the trainer split train_dataset: partition.png shows how
        self.client_eval_datasets: list | None = None  # held-out split per client (client_eval_fraction)
        if fa.client_eval_fraction > 0:
            splits = [split_for_evaluation(ds, fa.client_eval_fraction, args.seed, c)
                      for c, ds in enumerate(self.client_datasets)]
            self.client_datasets = [train for train, _ in splits]
            self.client_eval_datasets = [held for _, held in splits]
        # an IID split is known only when we made it; user-given clients may be anything
        iid_data = None if client_datasets is not None else fa.partition == "iid"
        model = self._ensure_peft(model)
        keep_quantized_layers_differentiable(model)

        super().__init__(
            model=model,
            args=args,
            train_dataset=self.client_datasets[0],
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            **kwargs,
        )
        self._zero3 = is_zero3(self.accelerator)
        if fa.prox_mu > 0 and self._zero3:
            raise ValueError("FederatedArguments.prox_mu > 0 is not supported under ZeRO-3: the proximal term needs "
                             "whole parameters on every rank; use ZeRO-2 or no DeepSpeed")
        self._proximal: ProximalTerm | None = None  # FedProx, live during a local round
        self._check_client_parallel()
        self.layers = lora_layers(self.model, ADAPTER)
        self.strategy: FederatedStrategy = strategy_from_options(
            fa.strategy, {**fa.strategy_options(iid_data), "rank": self.lora_rank}
        )
        logger.info("federated strategy: %s", self.strategy.summary())
        self._check_layer_shapes()
        self._extra_names = [
            n for n, p in self.model.named_parameters() if p.requires_grad and not self._is_lora_param(n)
        ]
        self.strategy.setup(get_lora_factors(self.layers, ADAPTER))
        self.server_optimizer = fa.make_server_optimizer(rank=self.lora_rank)
        self.strategy.set_client_ranks(dict(enumerate(resolve_client_ranks(fa.client_ranks, fa.num_clients,
                                                                           self.lora_rank))))
        if self.server_optimizer.describe():
            logger.info("server optimizer: %s", self.server_optimizer.describe())
        self._check_ga_samples()
        self.round_history: list[dict] = []
        self._round_ctx: tuple[int, int | None] | None = None  # (round number, client) for logs
        self._step_offset = 0
        self._log_history: list[dict] = []
        self._progress: FederatedProgressCallback | None = None
        self._replace_progress_bar()

    # ------------------------------------------------------------------ construction
    def _resolve_clients(self, train_dataset, client_datasets, seed: int) -> list:
        fa = self.fed_args
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

    def _ensure_peft(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, PeftModel, get_peft_model

        fa = self.fed_args
        if isinstance(model, PeftModel):
            config = model.peft_config.get(ADAPTER)
            if not isinstance(config, LoraConfig):
                raise ValueError("FederatedTrainer needs a PeftModel with a LoRA adapter named 'default'")
            if config.rank_pattern or config.alpha_pattern:
                raise ValueError("LoRA rank_pattern/alpha_pattern are not supported: every layer needs the same rank")
            return model
        targets = find_target_modules(model, fa.modules_to_save or ())
        if fa.target_modules:
            wanted = list(fa.target_modules)
            chosen = [n for n in targets if any(n == t or n.endswith("." + t) for t in wanted)]
            if not chosen:
                suffixes = sorted({n.rsplit(".", 1)[-1] for n in targets})
                raise ValueError(
                    f"FederatedArguments.target_modules={wanted} match no Linear layer of "
                    f"{type(model).__name__}; Linear layers end in: {suffixes}"
                )
            targets = chosen
        if not targets:
            raise ValueError(f"{type(model).__name__} has no nn.Linear layer to adapt (target_modules)")
        config = LoraConfig(
            r=fa.lora_r,
            lora_alpha=fa.lora_alpha,
            lora_dropout=fa.lora_dropout,
            use_rslora=fa.use_rslora,
            target_modules=targets,
            modules_to_save=fa.modules_to_save,
        )
        return get_peft_model(model, config)

    @property
    def lora_rank(self) -> int:
        return int(self.model.peft_config[ADAPTER].r)

    def _check_layer_shapes(self) -> None:
        gradient_aligned = self.strategy.needs_gradient
        need = 2 * self.lora_rank if gradient_aligned else self.lora_rank
        what = "2 * lora_r" if gradient_aligned else "lora_r"
        for name, layer in self.layers.items():
            d_out, d_in = layer.out_features, layer.in_features
            if need > min(d_out, d_in):
                raise ValueError(
                    f"lora_r={self.lora_rank} is too large for layer '{name}' ({d_out}x{d_in}): "
                    f"{what} must be <= {min(d_out, d_in)}"
                )

    def _check_client_parallel(self) -> None:
        if not self.fed_args.client_parallel:
            return
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "FederatedArguments.client_parallel=True trains one client per process and cannot be combined "
                "with DeepSpeed or FSDP (they split one client's training over the processes); drop one of them"
            )

    @property
    def client_parallel(self) -> bool:
        """Whether this run trains several clients at once, one per process."""
        return self.fed_args.client_parallel and world()[1] > 1

    @contextlib.contextmanager
    def global_model(self):
        """The current global model for inference (e.g. ``generate``); whole on every rank under ZeRO-3."""
        with self._gathered(modify=True):
            self._load_global_adapter()
        with self._gathered():
            yield self.model

    def _gathered(self, modify: bool = False):
        """Whole parameters under ZeRO-3 (see :func:`fedsmooth_hf.distributed.gathered`)."""
        return gathered(self.model, modify) if self._zero3 else contextlib.nullcontext()

    def _check_ga_samples(self) -> None:
        """A client smaller than ``ga_samples`` calibrates on all its examples (said once, here)."""
        if not self.strategy.needs_gradient:
            return
        small = {i: len(ds) for i, ds in enumerate(self.client_datasets) if len(ds) < self.fed_args.ga_samples}
        if small:
            logger.warning(
                "ga_samples=%d exceeds the size of %d client(s); they estimate their gradient on all their "
                "examples: %s", self.fed_args.ga_samples, len(small),
                ", ".join(f"client {i}: {n}" for i, n in list(small.items())[:10]) + (" ..." if len(small) > 10 else ""),
            )

    @staticmethod
    def _is_lora_param(name: str) -> bool:
        return ".lora_" in name

    def _replace_progress_bar(self) -> None:
        """Our bar runs over rounds x clients; Trainer's own would restart every local round."""
        self.callback_handler.remove_callback(ProgressCallback)

    # ------------------------------------------------------------------ helpers
    def _fire(self, event: str, **kwargs) -> None:
        assert event in ROUND_EVENTS
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, FederatedCallback):
                getattr(cb, event)(self.args, self.state, self.control, **kwargs)

    def sample_clients(self, round_idx: int) -> list[int]:
        """Clients of round ``round_idx`` (0-based): a seeded draw that depends only on (seed, round)."""
        fa = self.fed_args
        if fa.clients_per_round == fa.num_clients:
            return list(range(fa.num_clients))
        rng = np.random.default_rng([self.args.seed, round_idx])
        return sorted(int(c) for c in rng.choice(fa.num_clients, fa.clients_per_round, replace=False))

    def round_learning_rate(self, round_idx: int) -> float:
        fa = self.fed_args
        lr = self.args.learning_rate
        if fa.round_lr_schedule == "constant":
            return lr
        return fa.round_min_lr + 0.5 * (lr - fa.round_min_lr) * (1 + math.cos(math.pi * round_idx / fa.num_rounds))

    @contextlib.contextmanager
    def _local_round_args(self, learning_rate: float):
        """The user's TrainingArguments, with what a local round must own swapped in."""
        overrides = {
            "max_steps": self.fed_args.local_steps,
            "learning_rate": learning_rate,
            "save_strategy": SaveStrategy.NO,
            "eval_strategy": IntervalStrategy.NO,
            "load_best_model_at_end": False,
            "push_to_hub": False,
        }
        saved = {k: getattr(self.args, k) for k in overrides}
        try:
            for k, v in overrides.items():
                setattr(self.args, k, v)
            yield
        finally:
            for k, v in saved.items():
                setattr(self.args, k, v)

    def _release_engine(self) -> None:
        """Drop the optimizer, scheduler and any DeepSpeed/DDP wrapper of the last local round."""
        self.optimizer = None
        self.lr_scheduler = None
        engine = getattr(self, "deepspeed", None)
        if engine is not None:
            # DeepSpeedEngine.destroy() leaves its forward hooks on our model; each would keep
            # a dead engine alive (and running) for the rest of the federated run
            for attr in ("module_forward_pre_hook", "module_forward_post_hook"):
                handle = getattr(engine, attr, None)
                if handle is not None:
                    handle.remove()
                    setattr(engine, attr, None)
            if hasattr(engine, "destroy"):
                engine.destroy()
            self.deepspeed = None
        self.model_wrapped = self.model
        if self.is_deepspeed_enabled:
            # drop the engine now; otherwise the next local round's own free_memory() does it
            self.accelerator.free_memory()

    def _calibration_batches(self, client: int, seed: int):
        fa = self.fed_args
        ds = self.client_datasets[client]
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.permutation(len(ds))[: min(fa.ga_samples, len(ds))])
        world, rank = self.args.world_size, self.args.process_index
        idx = idx[rank::world] if world > 1 else idx
        subset = ds.select(idx.tolist()) if hasattr(ds, "select") else torch.utils.data.Subset(ds, idx.tolist())
        if hasattr(subset, "column_names"):
            subset = self._remove_unused_columns(subset, description="calibration")
        loader = torch.utils.data.DataLoader(subset, batch_size=fa.ga_batch_size, collate_fn=self.data_collator)
        for batch in loader:
            yield self._prepare_inputs(batch)

    def _estimate_gradients(self, client: int, seed: int, point) -> dict:
        """dL/dW of every adapted layer at the global model shifted by ``s * point`` (if any),
        as the per-layer estimates the strategy asked for (``strategy.gradient_request()``)."""
        self._load_global_adapter()
        if point is not None:
            set_offsets(self.layers, point, ADAPTER)
        reduce_fn = (lambda g: self.accelerator.reduce(g, "mean")) if self.args.world_size > 1 else None
        try:
            return estimate_gradient_subspaces(
                self.model,
                self.layers,
                self._calibration_batches(client, seed),
                loss_fn=lambda m, b: self.compute_loss(m, b),
                reduce_fn=reduce_fn,
                **self.strategy.gradient_request(),
            )
        finally:
            clear_offsets(self.layers)

    def _load_global_adapter(self) -> None:
        """The global model: base weights (+ the strategy's global adapter), no offsets."""
        clear_offsets(self.layers)
        glob = self.strategy.global_lora()
        if glob is None:
            glob = {n: (torch.zeros_like(B), A) for n, (B, A) in self.strategy.init_lora.items()}
        set_lora_factors(self.layers, glob, ADAPTER)

    def _extras(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().float().cpu().clone() for n in self._extra_names}

    @torch.no_grad()
    def _set_extras(self, values: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for n, v in values.items():
            params[n].copy_(v)

    # ------------------------------------------------------------------ Trainer hooks
    def is_world_process_zero(self) -> bool:
        """Rank 0 of the real process group, also inside a client-parallel local round."""
        return world()[0] == 0 if self.client_parallel else super().is_world_process_zero()

    def is_local_process_zero(self) -> bool:
        return world()[0] == 0 if self.client_parallel else super().is_local_process_zero()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Every log line carries ``round`` (and ``client`` inside a local round); steps run on."""
        if self._round_ctx is None:
            return super().log(logs, start_time)
        round_number, client = self._round_ctx
        logs = {**logs, "round": round_number}
        if client is not None:
            logs["client"] = client
        inner = self.state.global_step
        self.state.global_step = self._step_offset + inner
        try:
            super().log(logs, start_time)
        finally:
            self.state.global_step = inner
        # Trainer starts a new TrainerState every local round; the run's history lives here.
        self._log_history.append(self.state.log_history[-1])

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._round_ctx is not None:
            round_number, client = self._round_ctx
            step = self.state.global_step + 1
            if not torch.isfinite(loss).all():
                raise ClientTrainingError(round_number, client, f"non-finite training loss ({loss.item()}) at local step {step}")
            # fp16 loss scaling expects inf gradients now and then and skips those steps itself
            if getattr(self.accelerator, "scaler", None) is None:
                grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
                bad = first_non_finite(grads)
                if bad is not None:
                    raise ClientTrainingError(round_number, client, f"non-finite gradient of '{bad}' at local step {step}")
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss, plus FedProx's proximal term while a local round trains.

        The term enters each optimizer step once: where Trainer divides micro-batch losses
        by the accumulation steps it is added whole, where the loss is already normalized
        over the accumulated batch it is added in equal shares.
        """
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._proximal is None or not model.training:
            return out
        loss, outputs = out if return_outputs else (out, None)
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        loss = loss + self._proximal() / (self.current_gradient_accumulation_steps if scaled else 1)
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args, **kwargs):
        """Evaluate the current model; under DeepSpeed without a live engine as well.

        Between local rounds no DeepSpeed engine exists. Evaluation runs on the plain
        model: under ZeRO-1/2 every rank holds whole parameters (Trainer would otherwise
        refuse "ZeRO inference" below stage 3); under ZeRO-3 they are gathered first.
        """
        if not self.is_deepspeed_enabled:
            return super().evaluate(*args, **kwargs)
        self.is_deepspeed_enabled = False
        try:
            with self._gathered():
                return super().evaluate(*args, **kwargs)
        finally:
            self.is_deepspeed_enabled = True
            self._release_engine()

    # ------------------------------------------------------------------ the round loop
    def _train_client(self, round_idx: int, client: int, lr: float, ignore_keys_for_eval=None) -> dict:
        seed = _client_round_seed(self.args.seed, round_idx, client)
        set_seed(seed)
        grads = None
        # strategy_overhead_s: everything the strategy adds to a plain local round (gradient
        # pass, subspace reconstruction / SVDs, client start, upload truncation), one timer.
        t_start = time.perf_counter()
        with self._gathered(modify=True):
            if self.strategy.needs_gradient:
                grads = self._estimate_gradients(client, seed, self.strategy.gradient_point(client))
            start = self.strategy.client_start(client, grads)
            del grads
            rank = self.strategy.client_rank(client)  # below lora_r: zero-padded, the rest masked (client_rank.py)
            apply_client_start(self.layers, pad_factors(start.lora, self.lora_rank), start.offsets,
                               start.train_A, start.train_B, ADAPTER)
        mask = RankMask(self.layers, rank, ADAPTER) if rank < self.lora_rank else None
        overhead = time.perf_counter() - t_start
        self.train_dataset = self.client_datasets[client]
        if self.fed_args.prox_mu > 0:
            self._proximal = ProximalTerm(self.model, self.fed_args.prox_mu)
        set_seed(seed)  # data order and dropout of this local round
        t0 = time.perf_counter()
        try:
            with self._local_round_args(lr):
                out = super().train(ignore_keys_for_eval=ignore_keys_for_eval)
        finally:
            self._step_offset += self.state.global_step
            self._proximal = None
            if mask is not None:
                mask.remove()
            self._release_engine()
            clear_offsets(self.layers)
        with self._gathered():
            trained = truncate_factors(get_lora_factors(self.layers, ADAPTER), rank)
            extras = self._extras()
        if not math.isfinite(out.training_loss):
            raise ClientTrainingError(round_idx + 1, client, f"non-finite training loss {out.training_loss}")
        for name, (B, A) in trained.items():
            if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
                raise ClientTrainingError(round_idx + 1, client, f"non-finite LoRA factors in '{name}'")
        bad = first_non_finite(extras)
        if bad is not None:
            raise ClientTrainingError(round_idx + 1, client, f"non-finite values in '{bad}'")
        train_time = time.perf_counter() - t0
        t_upload = time.perf_counter()
        upload = self.strategy.client_upload(client, trained)
        overhead += time.perf_counter() - t_upload
        return {
            "upload": upload,
            "extras": extras,
            "train_loss": float(out.training_loss),
            "train_time_s": train_time,
            "strategy_overhead_s": overhead,
            "first_loss": self._first_logged_loss(),
        }

    def _first_logged_loss(self) -> float | None:
        for entry in self.state.log_history:
            if "loss" in entry:
                return float(entry["loss"])
        return None

    # ------------------------------------------------------------------ one node of a federation
    def train_client_round(self, round_idx: int, client: int, ignore_keys_for_eval=None) -> dict:
        """Run client ``client``'s local round ``round_idx`` (0-based) on its own; return its upload.

        The step ``train()`` runs for every sampled client (gradient estimate, strategy
        start, Trainer inner loop, upload), for a process that holds one client of a
        federation (``fedsmooth_hf.flower``). Same seed, same result as inside ``train()``.
        Returns ``upload``, ``extras`` (trained ``modules_to_save``), ``train_loss`` and timings.
        """
        self.strategy.begin_round(round_idx)
        self._round_ctx = (round_idx + 1, client)
        try:
            return self._train_client(round_idx, client, self.round_learning_rate(round_idx), ignore_keys_for_eval)
        finally:
            self._round_ctx = None

    @torch.no_grad()
    def apply_server_update(self, update: ServerUpdate, extras: dict[str, torch.Tensor] | None = None) -> None:
        """Take a round's aggregate: merge it into the base and adopt the server's strategy state.

        How a federation's server and clients keep identical base weights: each applies
        the same broadcast update (``train()`` does the same after its own aggregate).
        ``extras`` are the averaged ``modules_to_save`` values.
        """
        with self._gathered(modify=True):
            merge_into_base(self.layers, update.merge, ADAPTER)
            self.strategy.receive_update(update)
            if extras:
                self._set_extras(extras)
            self._load_global_adapter()

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run the federated rounds; ``resume_from_checkpoint`` continues after a saved round."""
        fa = self.fed_args
        start_round = 0
        if resume_from_checkpoint:
            path = latest_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
            if path is None:
                raise ValueError(f"no federated checkpoint (round-<k>/) found in {self.args.output_dir}")
            start_round = self.load_federated_checkpoint(path)
        if start_round == 0:
            self._save_partition_plot()
        if not self.args.disable_tqdm:
            total = fa.num_rounds * fa.clients_per_round
            self._progress = FederatedProgressCallback(total, initial=start_round * fa.clients_per_round)
            self.add_callback(self._progress)
        t_start = time.perf_counter()
        # Trainer runs a full gc.collect() at every local round; freezing the long-lived
        # objects (imports, datasets, model) keeps that from costing ~0.3 s per client round.
        gc.collect()
        gc.freeze()
        try:
            if start_round == 0 and self._eval_due(-1):
                self._evaluate_round(0, ignore_keys_for_eval, record=True)
            for round_idx in range(start_round, fa.num_rounds):
                self._run_round(round_idx, ignore_keys_for_eval)
        finally:
            if self._progress is not None:
                self._progress.close()
                self.remove_callback(self._progress)
                self._progress = None
            self._round_ctx = None
            self.state.log_history = list(self._log_history)
            gc.unfreeze()
        last = self.round_history[-1] if self.round_history else {}
        metrics = {"train_runtime": time.perf_counter() - t_start, "rounds": fa.num_rounds}
        metrics.update({k: v for k, v in last.items() if isinstance(v, float)})
        return TrainOutput(self._step_offset, float(last.get("train_loss", float("nan"))), metrics)

    def _save_partition_plot(self) -> None:
        """``output_dir/partition.png``: the clients' split by label or category (process 0, with matplotlib)."""
        if not self._partitioned or not self.args.should_save:
            return
        first = self.client_datasets[0]
        columns = getattr(first, "column_names", [])
        column = self.fed_args.partition_column or next(
            (c for c in ("label", "labels") if c in columns and len(first) and isinstance(first[0][c], (int, str))), None
        )  # a causal LM's "labels" are token lists, not classes
        path = Path(self.args.output_dir) / "partition.png"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            plot_partition(self.client_datasets, column, path,
                           title=f"{self.fed_args.partition} partition over {len(self.client_datasets)} clients")
        except ImportError:
            logger.info("matplotlib is not installed: no partition.png")

    def _eval_due(self, round_idx: int) -> bool:
        fa = self.fed_args
        if (self.eval_dataset is None and self.client_eval_datasets is None) or fa.eval_rounds == 0:
            return False
        return round_idx < 0 or (round_idx + 1) % fa.eval_rounds == 0 or round_idx + 1 == fa.num_rounds

    def _run_round(self, round_idx: int, ignore_keys_for_eval) -> None:
        fa = self.fed_args
        number = round_idx + 1
        t0 = time.perf_counter()
        self.strategy.begin_round(round_idx)
        clients = self.sample_clients(round_idx)
        lr = self.round_learning_rate(round_idx)
        with self._gathered():
            global_extras = self._extras()
        self._fire("on_round_begin", round=number, clients=clients)
        outcomes = self._train_clients(round_idx, clients, lr, global_extras, ignore_keys_for_eval)
        uploads, weights, losses, failed, info = {}, {}, {}, {}, {}
        extra_sum: dict[str, torch.Tensor] = {}
        for client in clients:
            result = outcomes[client]
            if isinstance(result, ClientTrainingError):
                if fa.on_client_failure == "raise":
                    raise result
                logger.warning("skipping %s", result)
                failed[client] = result.reason
                continue
            uploads[client] = result["upload"]
            n = len(self.client_datasets[client])
            weights[client] = float(n)
            losses[client] = result["train_loss"]
            info[client] = {k: result[k] for k in ("train_time_s", "strategy_overhead_s", "first_loss")}
            for k, v in result["extras"].items():
                extra_sum[k] = extra_sum.get(k, 0) + n * v
        if not uploads:
            raise ClientTrainingError(number, None, f"every sampled client failed: {failed}")
        self._round_ctx = (number, None)
        previous = self.strategy.global_lora()
        update = self.strategy.aggregate(uploads, weights)
        update = self.server_optimizer.step(update, previous, self.strategy.server_space)
        total = sum(weights.values())
        self.apply_server_update(update, {k: v / total for k, v in extra_sum.items()} if extra_sum else None)
        record = {
            "round": number,
            "clients": clients,
            "learning_rate": lr,
            "train_loss": float(sum(weights[c] * losses[c] for c in losses) / total),
            "client_train_loss": {str(c): v for c, v in losses.items()},
            "client_first_loss": {str(c): info[c]["first_loss"] for c in info},
            "strategy_overhead_s": float(sum(i["strategy_overhead_s"] for i in info.values())),
            "local_train_time_s": float(sum(i["train_time_s"] for i in info.values())),
            "merge_norm": float(
                math.sqrt(sum(factored_norm([B], [A]) ** 2 for B, A in update.merge.values()))
            ) if update.merge else 0.0,
            "failed_clients": {str(c): r for c, r in failed.items()},
        }
        record.update(self.strategy.round_metrics())
        if self._eval_due(round_idx):
            record.update(self._evaluate_round(number, ignore_keys_for_eval, record=False))
        record["round_time_s"] = time.perf_counter() - t0
        self.round_history.append(record)
        self.log({"train_loss": record["train_loss"], "merge_norm": record["merge_norm"]})
        self._fire("on_round_end", round=number, metrics=record)
        if (fa.save_rounds and number % fa.save_rounds == 0) or number == fa.num_rounds:
            self.save_federated_checkpoint(number)

    def _train_clients(self, round_idx: int, clients: list[int], lr: float, global_extras, ignore_keys_for_eval) -> dict:
        """``client -> result dict or ClientTrainingError`` for every sampled client.

        Sequentially by default (each local round data-parallel over the processes);
        with ``client_parallel`` process r trains ``clients[r::world]`` and the
        results are exchanged, so every rank aggregates the same uploads in the same order.
        """
        number = round_idx + 1
        rank, size = world() if self.client_parallel else (0, 1)
        view = single_process_view if self.client_parallel else contextlib.nullcontext
        outcomes = {}
        for client in clients[rank::size]:
            self._round_ctx = (number, client)
            self._fire("on_client_begin", round=number, client=client)
            with self._gathered(modify=True):
                self._set_extras(global_extras)
            try:
                with view():
                    outcomes[client] = self._train_client(round_idx, client, lr, ignore_keys_for_eval)
            except Exception as err:  # noqa: BLE001 - the failure policy decides
                error = err if isinstance(err, ClientTrainingError) else ClientTrainingError(number, client, repr(err))
                if self.fed_args.on_client_failure == "raise" and not self.client_parallel:
                    raise error from err
                outcomes[client] = error
            if not self.client_parallel:
                self._client_end(number, client, outcomes[client])
        if self.client_parallel:
            local = outcomes
            outcomes = {}
            for part in all_gather_objects(local):
                outcomes.update(part)
            for client in clients:
                result = outcomes[client]
                if client not in local and not isinstance(result, ClientTrainingError):
                    self.strategy.remember_upload(client, result["upload"])
                self._client_end(number, client, result)
        return outcomes

    def _client_end(self, number: int, client: int, result) -> None:
        if isinstance(result, ClientTrainingError):
            metrics = {"failed": result.reason}
        else:
            metrics = {"train_loss": result["train_loss"],
                       **{k: result[k] for k in ("train_time_s", "strategy_overhead_s", "first_loss")}}
        self._fire("on_client_end", round=number, client=client, metrics=metrics)

    def _evaluate_round(self, number: int, ignore_keys_for_eval, record: bool) -> dict:
        self._round_ctx = (number, None)
        with self._gathered(modify=True):
            self._load_global_adapter()
        out = {}
        if self.eval_dataset is not None:
            metrics = self.evaluate(ignore_keys=ignore_keys_for_eval)
            out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.client_eval_datasets is not None:
            out.update(self.evaluate_clients(ignore_keys_for_eval))
        if record:
            self.round_history.append({"round": number, **out})
            self._fire("on_round_end", round=number, metrics=self.round_history[-1])
        return out

    def evaluate_clients(self, ignore_keys_for_eval=None) -> dict:
        """The current model on every client's held-out split: per-client metrics, mean, std, worst."""
        per_client = {}
        for client, held in enumerate(self.client_eval_datasets or []):
            metrics = self.evaluate(eval_dataset=held, ignore_keys=ignore_keys_for_eval, metric_key_prefix="eval")
            per_client[client] = {k.removeprefix("eval_"): float(v) for k, v in metrics.items()
                                  if isinstance(v, (int, float)) and not k.endswith(("_runtime", "_per_second"))
                                  and k != "epoch"}
        summary = summarize_client_metrics(per_client)
        self.log({k: v for k, v in summary.items() if isinstance(v, float)})
        return summary

    # ------------------------------------------------------------------ checkpoints
    def _model_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, layer in self.layers.items():
            base = layer.get_base_layer()
            if not is_quantized(base):
                tensors[f"base/{name}"] = base.weight.detach()
            res = base_residual(layer)
            if res is not None and res.B is not None:
                tensors[f"residual/{name}/B"] = res.B
                tensors[f"residual/{name}/A"] = res.A
        for n, v in self._extras().items():
            tensors[f"extra/{n}"] = v
        return tensors

    def save_federated_checkpoint(self, round_number: int) -> Path | None:
        """Write ``output_dir/round-<k>`` (process 0 only); safe against a kill at any point."""
        with self._gathered():  # collective under ZeRO-3: every rank takes part
            tensors = self._model_tensors()
        if not self.args.should_save:
            return None
        state = {
            "fed_args": self.fed_args.to_dict(),
            "seed": self.args.seed,
            "strategy": self.strategy.describe(),
            "round_history": self.round_history,
            "step_offset": self._step_offset,
            "rng": rng_state(),
        }
        return save_checkpoint(self.args.output_dir, round_number, tensors,
                               {**self.strategy.state_dict(), **self.server_optimizer.state_dict()}, state)

    @torch.no_grad()
    def load_federated_checkpoint(self, path) -> int:
        """Restore a ``round-<k>`` checkpoint; returns k (the number of completed rounds)."""
        with self._gathered(modify=True):
            return self._restore_checkpoint(path)

    def _restore_checkpoint(self, path) -> int:
        model_tensors, strategy_tensors, state = load_checkpoint(path)
        check_resumable(path, state, self.fed_args.to_dict(), self.args.seed, _RESUMABLE_CHANGES)
        residual_shapes = {n: (layer.out_features, layer.in_features) for n, layer in self.layers.items()
                           if keeps_residual(layer.get_base_layer())}
        check_model_tensors(path, model_tensors, self._model_tensors(), residual_shapes)
        optimizer_tensors = {k: strategy_tensors.pop(k) for k in list(strategy_tensors) if k.startswith("opt_")}
        check_strategy_tensors(path, strategy_tensors, self.strategy)
        restore_rng_state(path, state)
        for name, layer in self.layers.items():
            key = f"base/{name}"
            if key in model_tensors:
                layer.get_base_layer().weight.copy_(model_tensors[key])
            if f"residual/{name}/B" in model_tensors:
                res = ensure_base_residual(layer)
                device = layer.get_base_layer().weight.device
                res.B = model_tensors[f"residual/{name}/B"].to(device)
                res.A = model_tensors[f"residual/{name}/A"].to(device)
        self._set_extras({k[len("extra/"):]: v for k, v in model_tensors.items() if k.startswith("extra/")})
        self.strategy.load_state_dict(strategy_tensors)
        self.server_optimizer.load_state_dict(optimizer_tensors)
        self.round_history = list(state.get("round_history", []))
        self._step_offset = int(state.get("step_offset", 0))
        self._load_global_adapter()
        return int(state["round"])

    # ------------------------------------------------------------------ export
    def merged_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The global model's weights under the base architecture's names (LoRA merged)."""
        from .hub import merged_state_dict

        with self._gathered():
            return merged_state_dict(self.model, self.layers, self.strategy.global_lora(), ADAPTER, dtype)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the merged global model (a plain ``from_pretrained`` checkpoint), its card and history."""
        from .hub import model_card, save_merged_model

        output_dir = output_dir or self.args.output_dir
        with self._gathered():  # collective under ZeRO-3: every rank takes part, rank 0 writes
            if not self.args.should_save:
                return
            save_merged_model(self.model, self.layers, self.strategy.global_lora(), output_dir,
                              self.processing_class, ADAPTER)
        evals = [r for r in self.round_history if "eval_loss" in r]
        card = model_card(
            getattr(self.model.get_base_model().config, "_name_or_path", "") or "",
            self.fed_args.to_dict(),
            self.strategy.describe(),
            self.round_history,
            {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else None,
        )
        Path(output_dir, "README.md").write_text(card)
        Path(output_dir, "federated_history.json").write_text(
            json.dumps({"fed_args": self.fed_args.to_dict(), "round_history": self.round_history}, indent=1)
        )

    def export_adapter(self, original_model: nn.Module, output_dir: str, rank: int | None = None) -> Path:
        """Save what federated training changed as a PEFT LoRA adapter of rank ``rank`` (default lora_r).

        ``original_model`` is the model the run started from, freshly loaded; it is
        wrapped in place. See :func:`fedsmooth_hf.hub.export_lora_adapter`.
        """
        from .hub import export_lora_adapter

        with self._gathered():
            return export_lora_adapter(self.model, self.layers, self.strategy.global_lora(), original_model,
                                       output_dir, rank or self.lora_rank, ADAPTER)

    def push_to_hub(self, commit_message: str | None = "End of federated training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, **kwargs) -> str:
        """Save the merged model with its model card to ``output_dir`` and upload it.

        The repository is ``TrainingArguments.hub_model_id`` (default: the output
        directory's name); ``hub_token`` and ``hub_private_repo`` apply.
        """
        from .hub import push_folder_to_hub

        self.save_model(self.args.output_dir)
        if not self.args.should_save:
            return ""
        repo_id = self.args.hub_model_id or Path(self.args.output_dir).resolve().name
        # the model and its card only: federated checkpoints stay local
        return push_folder_to_hub(self.args.output_dir, repo_id, token=token or self.args.hub_token,
                                  private=self.args.hub_private_repo, commit_message=commit_message,
                                  ignore_patterns=["round-*", ".round-*", "checkpoint-*", "_*"])
