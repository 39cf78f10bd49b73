"""FRLoRA-style merge-and-reinit: merge the averaged product into W, restart LoRA.

Every round, ``W += s * sum_c w_c (B_c A_c - B_0 A_0)`` exactly (full-rank
aggregation, no truncation) and every client restarts from the initial adapter
``(B_0, A_0)``, so the total update is not limited to rank r. (A client of a smaller
rank starts from, and subtracts, the leading components of ``(B_0, A_0)``.)
"""

from __future__ import annotations

from ..math.lowrank import stack_factors
from .base import ClientStart, FederatedStrategy, ServerUpdate, product_sum
from .registry import register_strategy


@register_strategy
class FRLoRA(FederatedStrategy):
    name = "frlora"

    def client_start(self, client, grads=None):
        return ClientStart(lora=self._at_client_rank(client, self.init_lora))

    def aggregate(self, uploads, weights):
        w = self._validated(uploads, weights)
        if not self._client_ranks:
            merged = product_sum(uploads, w, extra=self.init_lora, extra_weight=-1.0)
        else:  # each client's change relative to its own start
            starts = {c: self._at_client_rank(c, self.init_lora) for c in uploads}
            merged = {name: stack_factors(
                [uploads[c][name][0] for c in uploads] + [starts[c][name][0] for c in uploads],
                [uploads[c][name][1] for c in uploads] + [starts[c][name][1] for c in uploads],
                [w[c] for c in uploads] + [-w[c] for c in uploads])
                for name in self.init_lora}
        return ServerUpdate(merge=merged, global_lora=self.init_lora)

    def dp_contribution(self, client, upload, form):
        """The client's change relative to its start, ``B_c A_c - B_0 A_0``, as stacked factors."""
        start = self.init_lora if client is None else self._at_client_rank(client, self.init_lora)
        return {n: stack_factors([B, start[n][0]], [A, start[n][1]], [1.0, -1.0]) for n, (B, A) in upload.items()}

    def aggregate_released(self, released):
        """Under DP: merge the released mean change ``Q Z`` (rank k, exactly) and restart LoRA."""
        return ServerUpdate(merge=dict(released["product"]), global_lora=self.init_lora)

    def global_lora(self):
        return self.init_lora
