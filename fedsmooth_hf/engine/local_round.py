"""One client's local round: the strategy's start, a real ``Trainer`` inner loop, the upload.

:func:`run_local_round` is what every executor runs for a client, in-process or on a
federation node (same seed, same result): the gradient pass the strategy asks for,
its client start (LoRA factors, frozen offsets), ``Trainer.train()`` under the user's
``TrainingArguments`` with the few settings a federation must own swapped in for its
duration and a seed that depends only on (seed, round, client), then the upload, as a
:class:`~fedsmooth_hf.engine.result.ClientResult`. Afterwards no optimizer, scheduler or
DeepSpeed engine is left alive for the next client.

A few arguments would mean the wrong thing inside one client's round: the length of a
whole run, checkpoints and evaluations, a best model chosen among a client's steps.
:func:`announce_overrides` says once, when the trainer is built, what a round replaces,
and warns where a value the user set has a federated equivalent, so a run planned as
``--max_steps 10`` does not silently become 1,000 steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time

import numpy as np
import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from ..math.lowrank import pad_factors, truncate_factors
from ..model.adapter import ADAPTER, apply_client_start, clear_offsets, get_lora_factors, set_offsets
from ..model.client_rank import RankMask
from ..model.gradients import estimate_gradient_subspaces
from ..model.merge import first_non_finite
from ..model.offsets import zero_adapters_bypassed
from ..model.proximal import ProximalTerm, proximal_loss
from .result import ClientResult, ClientTrainingError

__all__ = ["run_local_round", "client_round_seed", "local_round_args", "announce_overrides", "conflicting_arguments",
           "release_engine", "check_local_result", "first_logged_loss", "unpinned_without_accelerator"]

logger = logging.getLogger(__name__)


def client_round_seed(seed: int, round_idx: int, client: int) -> int:
    """A seed that depends only on (seed, round, client): resumable and order-independent."""
    return int(np.random.SeedSequence([seed, round_idx, client]).generate_state(1)[0])


# fields a user may have set with a meaning the federation replaces -> the federated equivalent
FEDERATED_EQUIVALENTS = {
    "max_steps": "--local_steps (optimizer steps per client round) and --num_rounds",
    "num_train_epochs": "--num_rounds (with --local_steps per client round)",
    "save_strategy": "--save_rounds (checkpoint every N rounds)",
    "eval_strategy": "--eval_rounds (evaluate the global model every N rounds)",
    "load_best_model_at_end": "--eval_rounds (the last round's global model is kept; trainer.round_history "
                              "holds every round's eval metrics)",
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}


def local_round_overrides(local_steps: int, learning_rate: float) -> dict:
    """What a local round sets on the user's ``TrainingArguments`` (``max_steps`` also makes
    ``num_train_epochs`` unused)."""
    return {
        "max_steps": local_steps,
        "learning_rate": learning_rate,
        "save_strategy": SaveStrategy.NO,
        "eval_strategy": IntervalStrategy.NO,
        "load_best_model_at_end": False,
        "push_to_hub": False,
    }


def _plain(value):
    return getattr(value, "value", value)


def conflicting_arguments(args: TrainingArguments) -> dict:
    """``field -> the user's value`` for each replaced field set away from its ``TrainingArguments`` default.

    ``"no"`` (no saves, no evaluations) is what a local round uses anyway: not a conflict.
    """
    values = {name: _plain(getattr(args, name)) for name in FEDERATED_EQUIVALENTS}
    return {name: v for name, v in values.items() if v != _plain(_DEFAULTS[name]) and v != "no"}


def announce_overrides(args: TrainingArguments, fed_args) -> None:
    """Log once what every local round replaces; one warning for the values that lose their meaning."""
    if not args.should_log:
        return
    total = fed_args.num_rounds * fed_args.clients_per_round * fed_args.local_steps
    plan = (f"{fed_args.num_rounds} rounds x {fed_args.clients_per_round} clients x "
            f"{fed_args.local_steps} local steps = {total} optimizer steps")
    logger.info(
        "each client round is a Trainer.train() with max_steps=local_steps=%d (num_train_epochs unused), "
        "save_strategy='no', eval_strategy='no', load_best_model_at_end=False, push_to_hub=False and the "
        "round's learning rate (round_lr_schedule=%s); the run: %s",
        fed_args.local_steps, fed_args.round_lr_schedule, plan,
    )
    conflicts = conflicting_arguments(args)
    if conflicts:
        logger.warning(
            "TrainingArguments replaced in every client round (the run: %s): %s",
            plan,
        "; ".join(f"{name}={value!r} -> use {FEDERATED_EQUIVALENTS[name]}" for name, value in conflicts.items()),
        )


class _DropInfo(logging.Filter):
    """Drops records below WARNING: Trainer's "Running training" banner, repeated every client round."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


@contextlib.contextmanager
def unpinned_without_accelerator(args: TrainingArguments):
    """``args`` with ``dataloader_pin_memory`` off for the ``with`` block where torch finds no accelerator.

    Pinned memory only speeds up copies to an accelerator; without one, torch ignores the setting
    and warns on every data loader that asks for it (``TrainingArguments``' default does). The
    loaders behave the same either way; the user's value is back afterwards.
    """
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    available = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    saved = args.dataloader_pin_memory
    if not available:
        args.dataloader_pin_memory = False
    try:
        yield args
    finally:
        args.dataloader_pin_memory = saved


@contextlib.contextmanager
def local_round_args(args: TrainingArguments, local_steps: int, learning_rate: float):
    """``args`` with the local round's overrides swapped in (restored after), Trainer's per-call banner silenced
    (and pinned memory off without an accelerator: :func:`unpinned_without_accelerator`)."""
    overrides = local_round_overrides(local_steps, learning_rate)
    saved = {k: getattr(args, k) for k in overrides}
    quiet = _DropInfo()
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addFilter(quiet)
    try:
        for k, v in overrides.items():
            setattr(args, k, v)
        with unpinned_without_accelerator(args):
            yield args
    finally:
        for k, v in saved.items():
            setattr(args, k, v)
        trainer_logger.removeFilter(quiet)


def release_engine(trainer) -> None:
    """Drop the optimizer, scheduler and any DeepSpeed/DDP wrapper of the last local round."""
    trainer.optimizer = None
    trainer.lr_scheduler = None
    engine = getattr(trainer, "deepspeed", None)
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
        trainer.deepspeed = None
    trainer.model_wrapped = trainer.model
    if trainer.is_deepspeed_enabled:
        # drop the engine now; otherwise the next local round's own free_memory() does it
        trainer.accelerator.free_memory()


def check_local_result(number: int, client: int, training_loss: float, trained, extras) -> None:
    """A :class:`ClientTrainingError` for a non-finite loss, LoRA factor or ``modules_to_save`` value."""
    if not math.isfinite(training_loss):
        raise ClientTrainingError(number, client, f"non-finite training loss {training_loss}")
    bad = next((n for n, (B, A) in trained.items() if first_non_finite({"B": B, "A": A}) is not None), None)
    if bad is not None:
        raise ClientTrainingError(number, client, f"non-finite LoRA factors in '{bad}'")
    bad = first_non_finite(extras)
    if bad is not None:
        raise ClientTrainingError(number, client, f"non-finite values in '{bad}'")


def first_logged_loss(log_history: list[dict]) -> float | None:
    """The first training loss a local round logged (None when it logged none)."""
    for entry in log_history:
        if "loss" in entry:
            return float(entry["loss"])
    return None


def calibration_batches(trainer, client: int, seed: int):
    """The strategy's calibration sample of ``client``'s data (seeded), in batches, split over the processes."""
    samples, batch_size = trainer.strategy.calibration()
    ds = trainer.client_dataset(client)
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[: min(samples, len(ds))])
    world, rank = trainer.args.world_size, trainer.args.process_index
    idx = idx[rank::world] if world > 1 else idx
    subset = ds.select(idx.tolist()) if hasattr(ds, "select") else torch.utils.data.Subset(ds, idx.tolist())
    if hasattr(subset, "column_names"):
        subset = trainer._remove_unused_columns(subset, description="calibration")
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=trainer.data_collator)
    for batch in loader:
        yield trainer._prepare_inputs(batch)


def estimate_client_gradients(trainer, client: int, seed: int, point) -> dict:
    """dL/dW of every adapted layer at the global model shifted by ``s * point`` (if any),
    as the per-layer estimates the strategy asked for (``strategy.gradient_request()``).

    A global adapter with ``B = 0`` (FedSmoothLoRA keeps none) adds exactly nothing, so the pass
    skips its matmuls (``zero_adapters_bypassed``): the same values, a cheaper forward and backward."""
    trainer.load_global_adapter()
    reduce_fn = (lambda g: trainer.accelerator.reduce(g, "mean")) if trainer.args.world_size > 1 else None
    with zero_adapters_bypassed(trainer.layers, ADAPTER):
        if point is not None:
            set_offsets(trainer.layers, point, ADAPTER)
        try:
            return estimate_gradient_subspaces(trainer.model, trainer.layers,
                                               calibration_batches(trainer, client, seed),
                                               loss_fn=lambda m, b: trainer.compute_loss(m, b), reduce_fn=reduce_fn,
                                               **trainer.strategy.gradient_request())
        finally:
            clear_offsets(trainer.layers)


def run_local_round(trainer, round_idx: int, client: int, learning_rate: float,
                    ignore_keys_for_eval=None) -> ClientResult:
    """Client ``client``'s round ``round_idx`` (0-based) on ``trainer`` (a ``FederatedTrainer``).

    ``strategy_overhead_s`` times everything the strategy adds to a plain local round (the
    gradient pass, subspace reconstruction and SVDs, the client start and setting the offsets,
    the upload's factorization).
    """
    strategy, fa = trainer.strategy, trainer.fed_args
    seed = client_round_seed(trainer.args.seed, round_idx, client)
    set_seed(seed)
    t_start = time.perf_counter()
    with trainer.gathered(modify=True):
        grads = None
        if strategy.needs_gradient:
            grads = estimate_client_gradients(trainer, client, seed, strategy.gradient_point(client))
        start = strategy.client_start(client, grads)
        del grads
        rank = strategy.client_rank(client)  # below lora_r: zero-padded, the rest masked (client_rank.py)
        apply_client_start(trainer.layers, pad_factors(start.lora, trainer.lora_rank), start.offsets,
                           start.train_A, start.train_B, ADAPTER)
    overhead = time.perf_counter() - t_start
    proximal = ProximalTerm(trainer.model, fa.prox_mu) if fa.prox_mu else None  # FedProx
    trainer.train_dataset = trainer.client_dataset(client)
    set_seed(seed)  # data order and dropout of this local round
    t0 = time.perf_counter()
    try:
        with local_round_args(trainer.args, fa.local_steps, learning_rate), proximal_loss(trainer, proximal), \
                RankMask(trainer.layers, rank, ADAPTER):
            out = Trainer.train(trainer, ignore_keys_for_eval=ignore_keys_for_eval)  # the inner loop, not the rounds
    finally:
        trainer.count_local_steps(trainer.state.global_step)
        release_engine(trainer)
        clear_offsets(trainer.layers)
    with trainer.gathered():
        trained = truncate_factors(get_lora_factors(trainer.layers, ADAPTER), rank)
        extras = trainer.extra_parameters()
    check_local_result(round_idx + 1, client, out.training_loss, trained, extras)
    train_time = time.perf_counter() - t0
    t_upload = time.perf_counter()
    upload = strategy.client_upload(client, trained)
    overhead += time.perf_counter() - t_upload
    return ClientResult(client=client, upload=upload, num_examples=len(trainer.train_dataset),
                        train_loss=float(out.training_loss), extras=extras, train_time_s=train_time,
                        strategy_overhead_s=overhead, first_loss=first_logged_loss(trainer.state.log_history),
                        strategy_metrics=strategy.client_metrics(client))
