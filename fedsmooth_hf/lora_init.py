"""Old home of the client-start code, kept so scripts that import from it keep working.

The Gradient-Aligned math is :mod:`fedsmooth_hf.gradient_aligned`; the PEFT plumbing
(layers, factors, frozen offsets) is :mod:`fedsmooth_hf.adapter`.
"""

from .adapter import (
    apply_client_start,
    clear_offsets,
    get_lora_factors,
    lora_layers,
    lora_scaling,
    set_lora_factors,
    set_offsets,
)
from .gradient_aligned import client_init_factors, gradient_aligned_factors

__all__ = ["gradient_aligned_factors", "client_init_factors", "lora_layers", "lora_scaling", "get_lora_factors",
           "set_lora_factors", "set_offsets", "clear_offsets", "apply_client_start"]
