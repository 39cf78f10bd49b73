"""Federated LoRA algorithms behind one interface; a new algorithm is one new module here."""

from . import fedex_lora, fedit, fedsmoothlora, ffa_lora, flexlora, frlora  # noqa: F401  (registration)
from .base import ClientStart, FederatedStrategy, GlobalAdapterStrategy, ServerUpdate
from .fedex_lora import FedExLoRA
from .fedit import FedIT
from .fedsmoothlora import FedSmoothLoRA, zeta_schedule
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
