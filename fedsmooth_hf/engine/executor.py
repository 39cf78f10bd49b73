"""The client-executor interface: how the sampled clients of a round are run.

The round around them (aggregate, merge, evaluate, checkpoint, events) is written once,
in :mod:`fedsmooth_hf.engine.rounds`. This module imports neither torch nor transformers, so a
Flower ServerApp module can define its executor without paying for them at import.
"""

from __future__ import annotations

from .result import ClientResult, ClientTrainingError

__all__ = ["ClientExecutor", "ClientResult", "ClientTrainingError"]


class ClientExecutor:
    """How the sampled clients of a round are run; the round around them is :class:`RoundEngine`'s.

    :meth:`run` returns ``client -> outcome`` for every sampled client: its
    :class:`~fedsmooth_hf.engine.result.ClientResult`, or a tolerated :class:`ClientTrainingError`;
    a failure the executor's policy does not tolerate it raises. It fires
    ``on_client_begin``/``on_client_end`` through ``engine.client_event``. ``engine`` is the
    :class:`~fedsmooth_hf.engine.rounds.RoundEngine` running the round.
    """

    def start(self, engine, start_round: int) -> None:
        """Before the first round this process runs (``start_round`` rounds are already done)."""

    def run(self, engine, round_idx: int, clients: list[int],
            learning_rate: float) -> dict[int, ClientResult | ClientTrainingError]:
        raise NotImplementedError

    def evaluate_clients(self, engine) -> dict:
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
