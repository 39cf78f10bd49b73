"""What turns ``Trainer.train()`` into one client's local round, and what it leaves to clean up.

A local round is a real ``Trainer`` inner loop under the user's ``TrainingArguments``,
with the few settings a federation must own swapped in for its duration, a seed that
depends only on (seed, round, client), and afterwards no optimizer, scheduler or
DeepSpeed engine left alive for the next client.

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

import numpy as np
from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

__all__ = ["client_round_seed", "local_round_args", "announce_overrides", "conflicting_arguments",
           "release_engine", "check_local_result", "first_logged_loss"]

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
    """What a local round sets on the user's ``TrainingArguments`` (``max_steps`` also makes ``num_train_epochs`` unused)."""
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
            plan, "; ".join(f"{name}={value!r} -> use {FEDERATED_EQUIVALENTS[name]}" for name, value in conflicts.items()),
        )


class _DropInfo(logging.Filter):
    """Drops records below WARNING: Trainer's "Running training" banner, repeated every client round."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


@contextlib.contextmanager
def local_round_args(args: TrainingArguments, local_steps: int, learning_rate: float):
    """``args`` with the local round's overrides swapped in (restored after), Trainer's per-call banner silenced."""
    overrides = local_round_overrides(local_steps, learning_rate)
    saved = {k: getattr(args, k) for k in overrides}
    quiet = _DropInfo()
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addFilter(quiet)
    try:
        for k, v in overrides.items():
            setattr(args, k, v)
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
    from .executor import ClientTrainingError
    from .merge import first_non_finite

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
