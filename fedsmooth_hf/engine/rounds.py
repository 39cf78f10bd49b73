"""The federated round, written once for every way a federation runs.

One round: sample clients, run them (an executor), aggregate their uploads with the
strategy, merge the aggregate into the base, evaluate and checkpoint when the
schedule says so, and fire the round events. ``FederatedTrainer.train()`` runs it
with a :class:`SequentialExecutor` (clients one after another, each local round
data-parallel over the processes) or a :class:`ClientParallelExecutor` (one client
per process); the Flower ServerApp runs the same loop with its own executor
(``fedsmooth_hf.flower.server.FlowerExecutor``), which sends the clients Grid messages.
So every way of running produces the same round records, logs and callbacks.

The loop talks to the trainer only through its public methods and steers like
``transformers.Trainer``: round events receive a :class:`~transformers.TrainerControl`
and may return it; ``should_evaluate``/``should_save`` (set by the schedule,
:class:`~fedsmooth_hf.engine.callbacks.FederatedFlowCallback`, or any callback) are read
after the round's merge, ``should_training_stop`` after its ``on_round_end``. A Ctrl-C while the loop
runs in one process ends it within one training step and before the round's aggregation, and says
which checkpoint resumes it (:mod:`.interrupt`).
"""

from __future__ import annotations

import gc
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerControl

from .callbacks import ROUND_EVENTS, FederatedCallback, FederatedProgressCallback
from .executor import ClientExecutor
from .interrupt import FederationInterrupted, InterruptCallback, resume_command, stop_message
from .local_round import unpinned_without_accelerator
from .privacy import dp_enabled, poisson_sample
from .result import ClientResult, ClientTrainingError

logger = logging.getLogger(__name__)

__all__ = ["sample_clients", "round_learning_rate", "federation_epoch", "describe_federation", "RoundEngine"]


def sample_clients(fed_args, seed: int, round_idx: int) -> list[int]:
    """Clients of round ``round_idx`` (0-based): a seeded draw that depends only on (seed, round);
    under client-level DP each client independently at rate ``clients_per_round / num_clients``."""
    fa = fed_args
    if dp_enabled(fa):
        return poisson_sample(fa.num_clients, fa.clients_per_round / fa.num_clients, seed, round_idx)
    if fa.clients_per_round == fa.num_clients:
        return list(range(fa.num_clients))
    rng = np.random.default_rng([seed, round_idx])
    return sorted(int(c) for c in rng.choice(fa.num_clients, fa.clients_per_round, replace=False))


def round_learning_rate(fed_args, learning_rate: float, round_idx: int) -> float:
    """The local rounds' learning rate in round ``round_idx``: constant, or cosine to ``round_min_lr``."""
    fa = fed_args
    if fa.round_lr_schedule == "constant":
        return learning_rate
    lo = fa.round_min_lr
    return lo + 0.5 * (learning_rate - lo) * (1 + math.cos(math.pi * round_idx / fa.num_rounds))


def federation_epoch(fed_args, step: int) -> float:
    """Rounds elapsed after ``step`` optimizer steps of the whole federation (what its logs call ``epoch``)."""
    return step / (fed_args.clients_per_round * fed_args.local_steps)


def describe_federation(state, fed_args, steps: int) -> None:
    """Make a ``TrainerState`` describe the federation, not its last local round: ``global_step`` and
    ``max_steps`` count every client's optimizer steps, ``epoch`` and ``num_train_epochs`` count rounds."""
    state.global_step, state.epoch = steps, federation_epoch(fed_args, steps)
    state.max_steps = fed_args.num_rounds * fed_args.clients_per_round * fed_args.local_steps
    state.num_train_epochs = fed_args.num_rounds


class RoundEngine:
    """The round loop over a trainer (the global model and its strategy) and a :class:`ClientExecutor`."""

    def __init__(self, trainer, executor: ClientExecutor, ignore_keys_for_eval=None):
        self.trainer = trainer
        self.executor = executor
        self.ignore_keys = ignore_keys_for_eval
        self.control = TrainerControl()
        self.interrupt: InterruptCallback | None = None  # Ctrl-C's graceful stop, while run() runs (interrupt.py)
        self.saved: Path | None = None  # the last round-<k> checkpoint this run wrote

    # ------------------------------------------------------------------ events
    def fire(self, event: str, **kwargs) -> TrainerControl:
        """Call ``event`` on every :class:`FederatedCallback`; a callback may return a new control."""
        assert event in ROUND_EVENTS
        t = self.trainer
        for cb in t.callback_handler.callbacks:
            if isinstance(cb, FederatedCallback):
                result = getattr(cb, event)(t.args, t.state, self.control, eval_dataset=t.eval_dataset, **kwargs)
                if result is not None:
                    self.control = result
        return self.control

    def client_event(self, event: str, number: int, client: int, result=None) -> None:
        """``on_client_begin`` (``result`` None) or ``on_client_end`` with the client's figures."""
        if event == "on_client_begin":
            self.fire(event, round=number, client=client)
            return
        if isinstance(result, ClientTrainingError):
            metrics = {"failed": result.reason}
        else:
            metrics = {k: result.figures()[k] for k in ("train_loss", "train_time_s", "strategy_overhead_s",
                                                         "first_loss")}
        self.fire(event, round=number, client=client, metrics=metrics)

    # ------------------------------------------------------------------ the loop
    def run(self, start_round: int = 0) -> int:
        """Rounds ``start_round + 1 .. num_rounds``; returns the number of completed rounds."""
        t, fa = self.trainer, self.trainer.fed_args
        progress = None
        if not t.args.disable_tqdm:
            progress = FederatedProgressCallback(fa.num_rounds * fa.clients_per_round,
                                                 initial=start_round * fa.clients_per_round, local_steps=fa.local_steps)
            t.add_callback(progress)
        self.interrupt = InterruptCallback.for_run(t, self.executor)
        if self.interrupt is not None:
            t.add_callback(self.interrupt)
        # Trainer runs a full gc.collect() at every local round; freezing the long-lived
        # objects (imports, datasets, model) keeps that from costing a full heap walk per client round.
        gc.collect()
        gc.freeze()
        stop = None
        try:
            with unpinned_without_accelerator(t.args):  # evaluations too: no torch warning on CPU
                return self._run(start_round)
        except FederationInterrupted as err:
            stop = err
            raise
        finally:
            if progress is not None:
                progress.close()
                t.remove_callback(progress)
            if self.interrupt is not None:
                self.interrupt.uninstall()
                t.remove_callback(self.interrupt)
            gc.unfreeze()
            if stop is not None:  # below the closed progress bar
                self._say_how_to_resume(stop, start_round)

    def _say_how_to_resume(self, stop: FederationInterrupted, start_round: int) -> None:
        """Fills in the checkpoint and the command of an interrupted run, and prints them."""
        fa = self.trainer.fed_args
        stop.checkpoint = self.saved
        resumed_from = Path(self.trainer.args.output_dir, f"round-{start_round}")
        again = resumed_from if stop.checkpoint is None and start_round and resumed_from.is_dir() else None
        stop.command = resume_command(stop.checkpoint or again)
        print(stop_message(stop, fa.num_rounds, fa.save_rounds, start_round), file=sys.stderr, flush=True)

    def _run(self, start_round: int) -> int:
        t = self.trainer
        self.executor.start(self, start_round)
        self.fire("on_federation_begin", round=start_round)
        if self.control.should_evaluate:
            record = {"round": start_round, **self._evaluate(start_round)}
            t.round_history.append(record)
            self.fire("on_round_end", round=start_round, metrics=record)
        done = start_round
        for round_idx in range(start_round, t.fed_args.num_rounds):
            if self.control.should_training_stop:
                break
            self.run_round(round_idx)
            done = round_idx + 1
        if self.interrupt is not None:
            self.interrupt.check(None)  # a signal after the last round's aggregation still stops the program
        self.executor.finish()
        return done

    def run_round(self, round_idx: int) -> dict:
        """One round; returns (and appends to ``trainer.round_history``) its record."""
        t = self.trainer
        number = round_idx + 1
        t0 = time.perf_counter()
        t.strategy.begin_round(round_idx)
        clients = t.sample_clients(round_idx)
        lr = t.round_learning_rate(round_idx)
        self.control.should_evaluate = self.control.should_save = False
        self.fire("on_round_begin", round=number, clients=clients)
        outcomes = self.executor.run(self, round_idx, clients, lr)
        t.round_context = (number, None)
        ok = {c: r for c, r in outcomes.items() if not isinstance(r, ClientTrainingError)}
        failed = {c: r.reason for c, r in outcomes.items() if isinstance(r, ClientTrainingError)}
        for c, reason in failed.items():
            logger.warning("skipping round %d, client %d: %s", number, c, reason)
        if not ok and (t.privacy is None or failed):
            raise ClientTrainingError(number, None, f"every sampled client failed: {failed}")
        uploads = {c: ok[c].upload for c in clients if c in ok}
        weights = {c: float(ok[c].num_examples) for c in uploads}
        total = sum(weights.values())
        previous = t.strategy.global_lora()
        privacy_record = {}
        if t.privacy is None:
            update = t.strategy.aggregate(uploads, weights)
        else:  # clipped, noised, uniformly weighted (engine/privacy.py); a Poisson round may have no client
            update, privacy_record = t.privacy.release(round_idx, uploads)
        update = t.server_optimizer.step(update, previous, t.strategy.server_space)  # "none": the update as is
        extras = self._mean_extras(ok, weights, total)
        t.apply_server_update(update, extras)
        self.executor.server_update(round_idx, update, extras)
        record = {
            "round": number,
            "clients": clients,
            "learning_rate": lr,
            "train_loss": float(sum(weights[c] * ok[c].train_loss for c in uploads) / total) if total else math.nan,
            "client_train_loss": {str(c): ok[c].train_loss for c in uploads},
            "client_first_loss": {str(c): ok[c].first_loss for c in uploads},
            "strategy_overhead_s": float(sum(ok[c].strategy_overhead_s for c in uploads)),
            "local_train_time_s": float(sum(ok[c].train_time_s for c in uploads)),
            "merge_norm": update.merge_norm(),
            "failed_clients": {str(c): r for c, r in failed.items()},
            **self.executor.round_record(),
            **privacy_record,
        }
        record.update(t.strategy.round_metrics({c: ok[c].strategy_metrics for c in uploads}))
        if self.control.should_evaluate:
            t_eval = time.perf_counter()
            record.update(self._evaluate(number))
            record["eval_time_s"] = time.perf_counter() - t_eval  # so a run's training time can leave it out
        record["round_time_s"] = time.perf_counter() - t0
        t.round_history.append(record)
        t.log({k: record[k] for k in ("train_loss", "merge_norm", "dp_epsilon") if k in record})
        self.fire("on_round_end", round=number, metrics=record)
        if self.control.should_save:
            self.saved = t.save_federated_checkpoint(number) or self.saved
        return record

    @staticmethod
    def _mean_extras(results: dict[int, ClientResult], weights: dict, total: float) -> dict[str, torch.Tensor] | None:
        """Example-weighted mean of the clients' ``modules_to_save`` values (None without any)."""
        sums: dict[str, torch.Tensor] = {}
        for c, w in weights.items():
            for k, v in results[c].extras.items():
                sums[k] = sums.get(k, 0) + w * v
        return {k: v / total for k, v in sums.items()} if sums else None

    def _evaluate(self, number: int) -> dict:
        """The global eval set and, with ``client_eval_fraction``, every client's held-out split."""
        t = self.trainer
        t.round_context = (number, None)
        metrics = t.evaluate_global(ignore_keys=self.ignore_keys)
        metrics.update(self.executor.evaluate_clients(self))
        return metrics
