"""Flower integration: run the same strategies as a real federation across machines.

``make_server_app(build_trainer)`` and ``make_client_app(build_trainer)`` wrap a
function that builds a :class:`~fedsmooth_hf.FederatedTrainer` (server: the global
model, ``partition_id=None``; client: a node with its data). See ``docs/flower.md``.
Needs the ``flower`` extra (``pip install fedsmooth_hf[flower]``).
"""

from .client import make_client_app
from .server import FederationError, FlowerExecutor, make_server_app, run_federation

__all__ = ["make_client_app", "make_server_app", "run_federation", "FlowerExecutor", "FederationError"]
