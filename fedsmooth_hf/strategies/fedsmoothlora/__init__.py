"""FedSmoothLoRA (arXiv 2605.29460): its options (:mod:`.config`) and its algorithm (:mod:`.strategy`)."""

from .config import STALE_ROUND_MATCHING, ZETA_MODES, FedSmoothLoRAConfig
from .strategy import FedSmoothLoRA, resolve_zeta_mode, zeta_schedule

__all__ = ["FedSmoothLoRA", "FedSmoothLoRAConfig", "ZETA_MODES", "STALE_ROUND_MATCHING", "resolve_zeta_mode",
           "zeta_schedule"]
