"""FlexLoRA: average the clients' products ``B A`` and project back to rank r by SVD.

The global adapter is ``SVD_r(sum_c w_c B_c A_c)``, computed exactly in factored
form; clients start the next round from it.
"""

from __future__ import annotations

from ..math.lowrank import truncated_svd
from .base import GlobalAdapterStrategy, ServerUpdate, truncated_product_mean
from .registry import register_strategy


@register_strategy
class FlexLoRA(GlobalAdapterStrategy):
    name = "flexlora"

    def aggregate(self, uploads, weights):
        w = self._validated(uploads, weights)
        self._global = truncated_product_mean(uploads, w, self.rank)
        return ServerUpdate(merge={}, global_lora=self._global)

    def aggregate_released(self, released):
        """Under DP: ``SVD_r`` of the released mean product ``Q Z``."""
        self._global = {n: truncated_svd([Q], [Z], self.rank) for n, (Q, Z) in released["product"].items()}
        return ServerUpdate(merge={}, global_lora=self._global)
