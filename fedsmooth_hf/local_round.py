"""What turns ``Trainer.train()`` into one client's local round, and what it leaves to clean up.

A local round is a real ``Trainer`` inner loop under the user's ``TrainingArguments``,
with the few settings a federation must own swapped in for its duration, a seed that
depends only on (seed, round, client), and afterwards no optimizer, scheduler or
DeepSpeed engine left alive for the next client.
"""

from __future__ import annotations

import contextlib

import numpy as np
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

__all__ = ["client_round_seed", "local_round_args", "release_engine", "first_logged_loss"]


def client_round_seed(seed: int, round_idx: int, client: int) -> int:
    """A seed that depends only on (seed, round, client): resumable and order-independent."""
    return int(np.random.SeedSequence([seed, round_idx, client]).generate_state(1)[0])


@contextlib.contextmanager
def local_round_args(args, local_steps: int, learning_rate: float):
    """The user's TrainingArguments, with what a local round must own swapped in (and restored after)."""
    overrides = {
        "max_steps": local_steps,
        "learning_rate": learning_rate,
        "save_strategy": SaveStrategy.NO,
        "eval_strategy": IntervalStrategy.NO,
        "load_best_model_at_end": False,
        "push_to_hub": False,
    }
    saved = {k: getattr(args, k) for k in overrides}
    try:
        for k, v in overrides.items():
            setattr(args, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(args, k, v)


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


def first_logged_loss(log_history: list[dict]) -> float | None:
    """The first training loss a local round logged (None when it logged none)."""
    for entry in log_history:
        if "loss" in entry:
            return float(entry["loss"])
    return None
