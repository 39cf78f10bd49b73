"""The client-executor interface: how the sampled clients of a round are run.

The round around them (aggregate, merge, evaluate, checkpoint, events) is written once,
in :mod:`fedsmooth_hf.rounds`. This module imports neither torch nor transformers, so a
Flower ServerApp module can define its executor without paying for them at import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .rounds import RoundEngine

__all__ = ["ClientExecutor", "ClientTrainingError", "CLIENT_FIGURES"]

#: what a client's round reports besides its upload, copied into ``on_client_end`` metrics
CLIENT_FIGURES = ("train_time_s", "strategy_overhead_s", "first_loss")


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


class ClientExecutor:
    """How the sampled clients of a round are run; the round around them is :class:`RoundEngine`'s.

    :meth:`run` returns ``client -> result`` for every sampled client, where a result is
    the dict of ``FederatedTrainer.train_client_round`` (``upload``, ``extras``,
    ``num_examples``, ``train_loss``, timings, ``strategy_metrics``) or a tolerated
    :class:`ClientTrainingError`; a failure the executor's policy does not tolerate it raises.
    It fires ``on_client_begin``/``on_client_end`` through ``engine.client_event``.
    """

    def start(self, engine: RoundEngine, start_round: int) -> None:
        """Before the first round this process runs (``start_round`` rounds are already done)."""

    def run(self, engine: RoundEngine, round_idx: int, clients: list[int], learning_rate: float) -> dict:
        raise NotImplementedError

    def evaluate_clients(self, engine: RoundEngine) -> dict:
        """Per-client evaluation (``client_eval_fraction``): the global model on every client's
        held-out split, summarized; here in this process, where the trainer holds every split."""
        trainer = engine.trainer
        if trainer.client_eval_datasets is None:
            return {}
        from .client_eval import evaluate_clients

        return evaluate_clients(trainer, trainer.client_eval_datasets, engine.ignore_keys)

    def round_record(self) -> dict:
        """Fields this executor adds to the round's record (Flower: bytes on the wire)."""
        return {}

    def server_update(self, round_idx: int, update, extras: dict | None) -> None:
        """Called after the round's update is merged on this side (Flower: queue it for the clients)."""

    def finish(self) -> None:
        """After the last round (Flower: bring every client to the final model)."""
