"""fedsmooth_hf: federated LoRA fine-tuning (FedSmoothLoRA and baselines) for transformers.Trainer.

Names are imported on first use: a Flower ClientApp process that only forwards a round
to its node's worker (``fedsmooth_hf.flower``) must not pay for importing torch and
transformers on every message.
"""

from importlib import import_module

from .version import __version__

_EXPORTS = {
    "FederatedArguments": ".arguments",
    "FederatedTrainingArguments": ".arguments",
    "FederatedCallback": ".callbacks",
    "FederatedTrainer": ".trainer",
    "truncated_svd": ".lowrank",
    "available_strategies": ".strategies",
    "get_strategy": ".strategies",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
