"""FedEx-LoRA: FedAvg of A and B, plus the exact residual folded into the base.

The residual ``mean(B A) - mean(B) mean(A)`` is merged into ``W`` so the global
model equals the average of the client models exactly. It is merged from stacked
factors (``sum_c w_c B_c A_c - B_bar A_bar``): one exact ``addmm``, never a dense
sum built matrix by matrix.
"""

from __future__ import annotations

from ..math.lowrank import stack_factors
from .base import (
    UPLOAD_PREFIX,
    GlobalAdapterStrategy,
    ServerUpdate,
    product_sum,
    unflatten_factors,
    weighted_factor_mean,
)
from .registry import register_strategy


@register_strategy
class FedExLoRA(GlobalAdapterStrategy):
    name = "fedex_lora"
    accepts_peft_init = True  # clients start from the one global adapter
    dp_forms = ("factors", "product")  # the averaged factors, and the products for the residual

    def aggregate(self, uploads, weights):
        w = self._validated(uploads, weights)
        mean = weighted_factor_mean(self._padded(uploads), w)
        residual = product_sum(uploads, w, extra=mean, extra_weight=-1.0)
        self._global = mean
        return ServerUpdate(merge=residual, global_lora=self._global)

    def aggregate_released(self, released):
        """Under DP: the noisy mean factors, and the residual ``mean(B A) - mean(B) mean(A)`` from the noisy
        mean product ``Q Z``."""
        mean = unflatten_factors(UPLOAD_PREFIX, released["factors"])
        residual = {n: stack_factors([Q, mean[n][0]], [Z, mean[n][1]], [1.0, -1.0])
                    for n, (Q, Z) in released["product"].items()}
        self._global = mean
        return ServerUpdate(merge=residual, global_lora=self._global)
