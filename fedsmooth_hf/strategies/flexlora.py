"""FlexLoRA: average the clients' products ``B A`` and project back to rank r by SVD.

The global adapter is ``SVD_r(sum_c w_c B_c A_c)``, computed exactly in factored
form; clients start the next round from it.
"""

from __future__ import annotations

from ..lowrank import truncated_svd
from .base import GlobalAdapterStrategy, ServerUpdate
from .registry import register_strategy


@register_strategy
class FlexLoRA(GlobalAdapterStrategy):
    name = "flexlora"

    def aggregate(self, uploads, weights):
        w = self._validated(uploads, weights)
        clients = list(uploads)
        self._global = {
            name: truncated_svd(
                [uploads[c][name][0] for c in clients],
                [uploads[c][name][1] for c in clients],
                self.rank,
                [w[c] for c in clients],
            )
            for name in self.init_lora
        }
        return ServerUpdate(merge={}, global_lora=self._global)
