"""FedIT: FedAvg of the LoRA factors, A and B averaged separately.

The simplest federated LoRA. Its global model ``W + s * mean(B) mean(A)`` is not the
average of the clients' models ``W + s * mean(B A)``: the mismatch the other
methods correct.
"""

from __future__ import annotations

from .base import UPLOAD_PREFIX, GlobalAdapterStrategy, ServerUpdate, unflatten_factors, weighted_factor_mean
from .registry import register_strategy


@register_strategy
class FedIT(GlobalAdapterStrategy):
    name = "fedit"
    accepts_peft_init = True  # clients start from the one global adapter
    server_space = "factors"
    dp_forms = ("factors",)

    def aggregate(self, uploads, weights):
        w = self._validated(uploads, weights)
        self._global = weighted_factor_mean(self._padded(uploads), w)
        return ServerUpdate(merge={}, global_lora=self._global)

    def aggregate_released(self, released):
        """Under DP: the global adapter is the noisy mean of the factors."""
        self._global = unflatten_factors(UPLOAD_PREFIX, released["factors"])
        return ServerUpdate(merge={}, global_lora=self._global)
