"""Round-level events for ``TrainerCallback`` users, and a progress bar over rounds x clients.

A :class:`FederatedCallback` is an ordinary ``transformers.TrainerCallback`` (so
``on_log``, ``on_step_end`` ... keep firing inside every local round) with four
more events the round loop (:mod:`fedsmooth_hf.engine.rounds`) calls::

    on_federation_begin(args, state, control, round)
    on_round_begin(args, state, control, round, clients)
    on_client_begin(args, state, control, round, client)
    on_client_end(args, state, control, round, client, metrics)
    on_round_end(args, state, control, round, metrics)

``round`` counts from 1; ``on_round_end`` also fires for round 0, the evaluation before
training (when an eval_dataset is given). ``metrics`` are plain dicts (``train_loss``, ``eval_loss``...).
``on_federation_begin`` fires once before the first round a run executes (``round``: rounds
already done, 0 unless resumed).

Like ``transformers``' step events they steer the loop through ``control`` (a
``TrainerControl``, returned or changed in place): ``should_evaluate``/``should_save`` set by
``on_round_begin`` or ``on_client_end`` evaluate/checkpoint that round (set in
``on_federation_begin``: evaluate before training), and ``should_training_stop`` set by any
round event ends the federation after the current round. The schedule of
``FederatedArguments.eval_rounds``/``save_rounds`` is :class:`FederatedFlowCallback`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

__all__ = ["FederatedCallback", "FederatedFlowCallback", "FederatedProgressCallback", "RoundPrinterCallback",
           "PartitionPlotCallback", "ROUND_EVENTS", "install_round_callbacks"]

logger = logging.getLogger(__name__)

ROUND_EVENTS = ("on_federation_begin", "on_round_begin", "on_client_begin", "on_client_end", "on_round_end")


class FederatedCallback(TrainerCallback):
    """Base class: override any of the round events (all default to doing nothing)."""

    def on_federation_begin(self, args, state, control, round: int, **kwargs):
        pass

    def on_round_begin(self, args, state, control, round: int, clients: list[int], **kwargs):
        pass

    def on_client_begin(self, args, state, control, round: int, client: int, **kwargs):
        pass

    def on_client_end(self, args, state, control, round: int, client: int, metrics: dict, **kwargs):
        pass

    def on_round_end(self, args, state, control, round: int, metrics: dict, **kwargs):
        pass


class FederatedFlowCallback(FederatedCallback):
    """The evaluation and checkpoint schedule of a federation (the rounds' ``DefaultFlowCallback``).

    Evaluate before training and every ``eval_rounds`` rounds and after the last one (when
    an eval dataset or per-client held-out splits exist); checkpoint every ``save_rounds``
    rounds and after the last one (``save_rounds=-1``: never).
    """

    def __init__(self, fed_args):
        self.fed_args = fed_args

    def _evaluates(self, eval_dataset) -> bool:
        has_data = eval_dataset is not None or self.fed_args.client_eval_fraction > 0
        return has_data and self.fed_args.eval_rounds > 0

    def on_federation_begin(self, args, state, control, round, eval_dataset=None, **kwargs):
        control.should_evaluate = round == 0 and self._evaluates(eval_dataset)
        return control

    def on_round_begin(self, args, state, control, round, clients, eval_dataset=None, **kwargs):
        fa = self.fed_args
        last = round == fa.num_rounds
        control.should_evaluate = self._evaluates(eval_dataset) and (round % fa.eval_rounds == 0 or last)
        control.should_save = fa.save_rounds >= 0 and (bool(fa.save_rounds and round % fa.save_rounds == 0) or last)
        return control


class FederatedProgressCallback(FederatedCallback):
    """One bar for the whole run, in local steps (rounds x sampled clients x local_steps).

    It replaces the per-call bar of ``Trainer`` that would otherwise restart for every
    client round, and moves with every optimizer step inside a client round, so a slow
    round shows progress before it ends. A client round that ends early (a skipped
    failure, a client trained by another process) counts as its ``local_steps``.
    """

    def __init__(self, total_client_rounds: int, initial: int = 0, local_steps: int = 1):
        self.local_steps = local_steps
        self.total = total_client_rounds * local_steps
        self.done = initial * local_steps  # steps of the client rounds that ended
        self.bar = None

    def _ensure(self, state):
        if self.bar is None and state.is_world_process_zero:
            self.bar = tqdm(total=self.total, initial=self.done, desc="federated", unit="step", dynamic_ncols=True)

    def on_client_begin(self, args, state, control, round, client, **kwargs):
        self._ensure(state)
        if self.bar is not None:
            self.bar.set_description(f"round {round} client {client}")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None and self.bar.n < self.done + self.local_steps:
            self.bar.update(1)

    def on_client_end(self, args, state, control, round, client, metrics, **kwargs):
        self.done += self.local_steps
        if self.bar is not None:
            self.bar.update(self.done - self.bar.n)
            if "train_loss" in metrics:
                self.bar.set_postfix(train_loss=f"{metrics['train_loss']:.4f}")

    def on_round_end(self, args, state, control, round, metrics, **kwargs):
        if self.bar is not None and "eval_loss" in metrics:
            self.bar.set_postfix(eval_loss=f"{metrics['eval_loss']:.4f}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RoundPrinterCallback(FederatedCallback):
    """Prints one line per round, ``[round k] eval_accuracy=... eval_loss=...``, above the progress bar.

    ``FederatedTrainer`` adds one with the default keys unless ``callbacks`` holds one
    already; ``trainer.remove_callback(RoundPrinterCallback)`` silences it.

    Args:
        keys: metrics to show, in order, when a round has them (the worst client's, with
            ``client_eval_fraction``).
        perplexity: also show ``exp(eval_loss)`` (language models).
    """

    def __init__(self, keys=("eval_accuracy", "eval_loss", "client_eval_accuracy_worst", "client_eval_loss_worst",
                             "train_loss", "dp_epsilon"), perplexity: bool = False):
        self.keys = tuple(keys)
        self.perplexity = perplexity

    def on_round_end(self, args, state, control, round, metrics, **kwargs):
        if not state.is_world_process_zero:
            return
        parts = [f"[round {round}]"]
        parts += [f"{k}={metrics[k]:.4f}" for k in self.keys if k in metrics]
        if self.perplexity and "eval_loss" in metrics:
            parts.append(f"perplexity={math.exp(metrics['eval_loss']):.2f}")
        if "round_time_s" in metrics:
            parts.append(f"({metrics['round_time_s']:.1f} s)")
        tqdm.write(" ".join(parts))


class PartitionPlotCallback(FederatedCallback):
    """Saves ``output_dir/partition.png`` when a federation starts from round 0: the clients' split
    at a glance (:func:`fedsmooth_hf.data.summary.plot_partition`). ``FederatedTrainer`` adds it when it
    split ``train_dataset`` itself; without matplotlib it says so once and draws nothing."""

    def __init__(self, client_datasets, column: str | None, method: str):
        self.client_datasets, self.column, self.method = client_datasets, column, method

    def on_federation_begin(self, args, state, control, round, **kwargs):
        if round != 0 or not args.should_save:
            return
        from ..data.summary import plot_partition

        first = self.client_datasets[0]
        names = getattr(first, "column_names", [])
        column = self.column or next(  # a causal LM's "labels" are token lists, not classes
            (c for c in ("label", "labels") if c in names and len(first) and isinstance(first[0][c], (int, str))), None)
        path = Path(args.output_dir) / "partition.png"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            plot_partition(self.client_datasets, column, path,
                           title=f"{self.method} partition over {len(self.client_datasets)} clients")
        except ImportError:
            logger.info("matplotlib is not installed: no partition.png")


def install_round_callbacks(handler, fed_args, partitioned_clients=None) -> None:
    """A ``FederatedTrainer``'s default callbacks: the round schedule first, one progress bar (ours runs
    over the whole federation; Trainer's own would restart every local round), a line per round unless
    the user brought a :class:`RoundPrinterCallback`, and ``partition.png`` when the trainer split the data."""
    from transformers.trainer_callback import ProgressCallback

    handler.remove_callback(ProgressCallback)
    handler.callbacks.insert(0, FederatedFlowCallback(fed_args))
    if not any(isinstance(cb, RoundPrinterCallback) for cb in handler.callbacks):
        handler.add_callback(RoundPrinterCallback())
    if partitioned_clients is not None:
        handler.add_callback(PartitionPlotCallback(partitioned_clients, fed_args.partition_column, fed_args.partition))
