"""Federated LoRA algorithms behind one interface; a new algorithm is one new module here."""

import importlib
import pkgutil

from .base import ClientStart, FederatedStrategy, GlobalAdapterStrategy, ServerUpdate
from .fedex_lora import FedExLoRA
from .fedit import FedIT
from .fedsmoothlora import FedSmoothLoRA, FedSmoothLoRAConfig, zeta_schedule
from .ffa_lora import FFALoRA
from .flexlora import FlexLoRA
from .frlora import FRLoRA
from .registry import available_strategies, get_strategy, register_strategy, strategy_from_options

__all__ = [
    "ClientStart",
    "FederatedStrategy",
    "GlobalAdapterStrategy",
    "ServerUpdate",
    "FedSmoothLoRA",
    "FedSmoothLoRAConfig",
    "FedIT",
    "FFALoRA",
    "FedExLoRA",
    "FlexLoRA",
    "FRLoRA",
    "available_strategies",
    "get_strategy",
    "register_strategy",
    "strategy_from_options",
    "zeta_schedule",
]

# every module here registers its algorithm on import: a new algorithm is one new file
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
