"""The default executor: the sampled clients one after another in this process group.

Each local round may itself be data-parallel over the processes (``accelerate launch``,
DeepSpeed): every process takes part in every client's round.
"""

from __future__ import annotations

from .executor import ClientExecutor
from .result import ClientResult, ClientTrainingError

__all__ = ["SequentialExecutor"]


class SequentialExecutor(ClientExecutor):
    """One client after another; a failure is raised or recorded by ``on_client_failure``."""

    def __init__(self, trainer):
        self.trainer = trainer

    def _run_one(self, round_idx: int, client: int, learning_rate: float, extras, ignore_keys) -> ClientResult:
        return self.trainer.train_client_round(round_idx, client, ignore_keys, learning_rate=learning_rate,
                                               extras=extras)

    def run(self, engine, round_idx, clients, learning_rate):
        number, trainer = round_idx + 1, self.trainer
        global_extras = trainer.extra_parameters()
        outcomes = {}
        for client in clients:
            engine.client_event("on_client_begin", number, client)
            try:
                outcomes[client] = self._run_one(round_idx, client, learning_rate, global_extras, engine.ignore_keys)
            except Exception as err:  # noqa: BLE001 - the failure policy decides
                error = ClientTrainingError.wrap(number, client, err)
                if trainer.fed_args.on_client_failure == "raise":
                    raise error from err
                outcomes[client] = error
            engine.client_event("on_client_end", number, client, outcomes[client])
        return outcomes
