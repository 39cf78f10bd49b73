"""fedsmooth_hf: federated LoRA fine-tuning (FedSmoothLoRA and baselines) for transformers.Trainer."""

from .lowrank import truncated_svd
from .strategies import available_strategies, get_strategy
from .version import __version__

__all__ = ["__version__", "truncated_svd", "available_strategies", "get_strategy"]
