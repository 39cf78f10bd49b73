"""fedsmooth_hf: federated LoRA fine-tuning (FedSmoothLoRA and baselines) for transformers.Trainer."""

from .arguments import FederatedArguments
from .callbacks import FederatedCallback
from .lowrank import truncated_svd
from .strategies import available_strategies, get_strategy
from .trainer import FederatedTrainer
from .version import __version__

__all__ = [
    "__version__",
    "FederatedArguments",
    "FederatedCallback",
    "FederatedTrainer",
    "truncated_svd",
    "available_strategies",
    "get_strategy",
]
