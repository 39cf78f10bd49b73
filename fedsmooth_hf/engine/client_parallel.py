"""Client-parallel rounds: with N processes, N different clients train at once, one per process.

Process ``r`` trains ``clients[r::world]`` alone (its local round sees a one-process
world); the results are gathered with ``torch.distributed``, so every process
aggregates the same uploads in the same order and the run equals the sequential one.
"""

from __future__ import annotations

from ..model.distributed import all_gather_objects, single_process_view, world
from .result import ClientTrainingError
from .sequential import SequentialExecutor

__all__ = ["ClientParallelExecutor"]


class ClientParallelExecutor(SequentialExecutor):
    """Process ``r`` trains ``clients[r::world]`` on its own; the results are exchanged, so every
    rank aggregates the same uploads in the same order."""

    @staticmethod
    def check(trainer) -> None:
        """``FederatedArguments.client_parallel`` is refused where one client already spans the processes."""
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            raise ValueError(
                "FederatedArguments.client_parallel=True trains one client per process and cannot be combined "
                "with DeepSpeed or FSDP (they split one client's training over the processes); drop one of them"
            )

    def run(self, engine, round_idx, clients, learning_rate):
        number, trainer = round_idx + 1, self.trainer
        rank, size = world()
        global_extras = trainer.extra_parameters()
        local = {}
        for client in clients[rank::size]:
            engine.client_event("on_client_begin", number, client)
            try:
                with single_process_view():
                    local[client] = self._run_one(round_idx, client, learning_rate, global_extras, engine.ignore_keys)
            except Exception as err:  # noqa: BLE001 - raised below, on every rank, once all have reported
                local[client] = ClientTrainingError.wrap(number, client, err)
        outcomes = {}
        for part in all_gather_objects(local):
            outcomes.update(part)
        for client in clients:
            result = outcomes[client]
            if client not in local and not isinstance(result, ClientTrainingError):
                trainer.strategy.remember_upload(client, result.upload)
            engine.client_event("on_client_end", number, client, result)
        if trainer.fed_args.on_client_failure == "raise":
            for client in clients:
                if isinstance(outcomes[client], ClientTrainingError):
                    raise outcomes[client]
        return outcomes
