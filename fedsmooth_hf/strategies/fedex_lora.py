"""FedEx-LoRA: FedAvg of A and B, plus the exact residual folded into the base.

The residual ``mean(B A) - mean(B) mean(A)`` is merged into ``W`` so the global
model equals the average of the client models exactly. It is merged from stacked
factors (``sum_c w_c B_c A_c - B_bar A_bar``): one exact ``addmm``, never a dense
sum built matrix by matrix.
"""

from __future__ import annotations

from .base import GlobalAdapterStrategy, ServerUpdate, product_sum, weighted_factor_mean
from .registry import register_strategy


@register_strategy
class FedExLoRA(GlobalAdapterStrategy):
    name = "fedex_lora"

    def aggregate(self, uploads, weights):
        w = self._validated(uploads, weights)
        mean = weighted_factor_mean(self._padded(uploads), w)
        residual = product_sum(uploads, w, extra=mean, extra_weight=-1.0)
        self._global = mean
        return ServerUpdate(merge=residual, global_lora=self._global)
