"""Layer 3, the round engine: the one round loop (:mod:`.rounds`), the executors that run a round's
clients (:mod:`.executor`, :mod:`.sequential`, :mod:`.client_parallel`), one client's local round
(:mod:`.local_round`) and its :class:`~.result.ClientResult`, per-client evaluation and the round events."""
