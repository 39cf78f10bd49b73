"""What one client's local round hands to the round loop: a :class:`ClientResult`, or a failure.

The local round (:mod:`.local_round`) produces it, every executor returns it (in-process,
gathered across processes, or decoded from a Flower reply by ``flower.wire``), and the
round loop (:mod:`.rounds`) consumes it. One type for all of them, so a new figure is
added in one place. Imports neither torch nor transformers: a Flower ServerApp module
reads it before any model exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from ..math.factors import ModuleFactors

__all__ = ["ClientResult", "ClientTrainingError"]


class ClientTrainingError(RuntimeError):
    """A client's local round failed (exception or non-finite loss/upload); ``client`` is None for the round."""

    def __init__(self, round_number: int, client: int | None, reason: str):
        where = f"round {round_number}" if client is None else f"round {round_number}, client {client}"
        super().__init__(f"{where}: {reason}")
        self.round_number = round_number
        self.client = client
        self.reason = reason

    @classmethod
    def wrap(cls, round_number: int, client: int, error: Exception) -> ClientTrainingError:
        """``error`` as a failure of ``client`` in ``round_number`` (itself when it already is one)."""
        return error if isinstance(error, cls) else cls(round_number, client, repr(error))

    def __reduce__(self):  # client-parallel rounds send failures between processes
        return type(self), (self.round_number, self.client, self.reason)


@dataclass
class ClientResult:
    """One client's round, as the server needs it.

    Args:
        client: the client's id (its partition index).
        upload: the strategy's upload, factors by module (``FederatedStrategy.client_upload``).
        num_examples: the client's training examples: its aggregation weight.
        train_loss: mean training loss of the local round.
        extras: the client's values of the fully trained ``modules_to_save`` parameters, by name.
        train_time_s: seconds of the Trainer inner loop.
        strategy_overhead_s: seconds the strategy added around it (gradient pass, factorizations,
            setting and clearing offsets, upload truncation), one timer.
        first_loss: the first training loss the round logged (None when it logged none).
        strategy_metrics: the strategy's figures of this client's start (``client_metrics``), plain values.
    """

    client: int
    upload: ModuleFactors
    num_examples: int
    train_loss: float
    extras: dict[str, Tensor] = field(default_factory=dict)
    train_time_s: float = 0.0
    strategy_overhead_s: float = 0.0
    first_loss: float | None = None
    strategy_metrics: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        """The plain numbers and metadata (everything but the tensors), for events, logs and the wire."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("upload", "extras")}

    @classmethod
    def from_figures(cls, figures: dict[str, Any], upload: ModuleFactors, extras: dict[str, Tensor]) -> ClientResult:
        """Inverse of :meth:`figures` (extra keys are ignored: a newer sender may report more)."""
        known = {f.name for f in fields(cls)} - {"upload", "extras"}
        values = {k: v for k, v in figures.items() if k in known}
        return cls(upload=upload, extras=extras, **values)
