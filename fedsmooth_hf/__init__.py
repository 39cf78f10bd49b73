"""fedsmooth_hf: federated LoRA fine-tuning (FedSmoothLoRA and baselines) for transformers.Trainer.

The package is layered; each layer imports only the ones below it (docs/architecture.md,
enforced by the import-linter contracts in ``pyproject.toml``)::

    flower        Flower ServerApp/ClientApp over the engine
    trainer       FederatedTrainer, FederatedArguments, FederatedLoraConfig (the HF glue)
    engine        the round loop, executors, the local round, client eval, callbacks
    persistence   checkpoints, merged-model export, model card, Hub
    strategies | model | data   algorithms over factors | PEFT plumbing | partitioning
    math          factored low-rank algebra, sketches, Gradient-Aligned factors, server optimizers

Names are imported on first use: a Flower ClientApp process that only forwards a round
to its node's worker (``fedsmooth_hf.flower``) must not pay for importing torch and
transformers on every message.
"""

from importlib import import_module

from . import _moved, _quiet
from .version import __version__

_EXPORTS = {
    "FederatedArguments": ".trainer.arguments",
    "FederatedTrainingArguments": ".trainer.arguments",
    "FederatedLoraConfig": ".trainer.lora_config",
    "FederatedTrainer": ".trainer.trainer",
    "FedSmoothLoRAConfig": ".strategies.fedsmoothlora.config",
    "FederatedCallback": ".engine.callbacks",
    "ClientResult": ".engine.result",
    "ClientTrainingError": ".engine.result",
    "truncated_svd": ".math.lowrank",
    "available_strategies": ".strategies.registry",
    "get_strategy": ".strategies.registry",
}

__all__ = ["__version__", *_EXPORTS]

_moved.install()
_quiet.install()  # before transformers imports peft (and peft bitsandbytes): see _quiet.py


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    if name in _moved.MOVED:  # `from fedsmooth_hf import lowrank`: the old module path
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
