"""FRLoRA-style merge-and-reinit: merge the averaged product into W, restart LoRA.

Every round, ``W += s * sum_c w_c (B_c A_c - B_0 A_0)`` exactly (full-rank
aggregation, no truncation) and every client restarts from the initial adapter
``(B_0, A_0)``, so the total update is not limited to rank r.
"""

from __future__ import annotations

from .base import ClientStart, FederatedStrategy, ServerUpdate, product_sum
from .registry import register_strategy


@register_strategy
class FRLoRA(FederatedStrategy):
    name = "frlora"

    def client_start(self, client, grads=None):
        return ClientStart(lora=self.init_lora)

    def aggregate(self, uploads, weights):
        w = self._validated(uploads, weights)
        merged = product_sum(uploads, w, extra=self.init_lora, extra_weight=-1.0)
        return ServerUpdate(merge=merged, global_lora=self.init_lora)

    def global_lora(self):
        return self.init_lora
