"""FFA-LoRA: A stays frozen at its shared random init, only B is trained and averaged.

With A identical on every client, ``mean(B) A == mean(B A)``: FedAvg is exact, at
the price of half the trainable parameters. Since the server already holds A, an
upload sends only B: half the bytes of FedIT.
"""

from __future__ import annotations

from .base import (
    UPLOAD_PREFIX,
    ClientStart,
    GlobalAdapterStrategy,
    ServerUpdate,
    flatten_factors,
    unflatten_factors,
    weighted_factor_mean,
)
from .registry import register_strategy


@register_strategy
class FFALoRA(GlobalAdapterStrategy):
    name = "ffa_lora"
    accepts_peft_init = True  # clients start from the one global adapter
    server_space = "factors"
    dp_forms = ("factors",)

    def client_start(self, client, grads=None):
        return ClientStart(lora=self._at_client_rank(client, self._global), train_A=False)

    def encode_upload(self, client, upload):
        return {k: v for k, v in flatten_factors(UPLOAD_PREFIX, upload).items() if k.endswith("/B")}

    def decode_upload(self, client, wire):
        """B from the wire; A is the shared init (its leading rows for a client of smaller rank)."""
        return {n: (B, self.init_lora[n][1][: B.shape[1]].clone())
                for n, (B, _) in unflatten_factors(UPLOAD_PREFIX, wire).items()}

    def aggregate(self, uploads, weights):
        w = self._validated(uploads, weights)
        mean = weighted_factor_mean(self._padded(uploads), w)
        self._global = {n: (mean[n][0], self.init_lora[n][1].clone()) for n in mean}
        return ServerUpdate(merge={}, global_lora=self._global)

    def dp_contribution(self, client, upload, form):
        """Only B: A is the shared init, the same for every client (FFA-LoRA's DP advantage)."""
        return {k: v for k, v in super().dp_contribution(client, upload, form).items() if k.endswith("/B")}

    def aggregate_released(self, released):
        """Under DP: the noisy mean of B, with the shared A."""
        B = {k[: -len("/B")]: v for k, v in released["factors"].items()}
        self._global = {n: (B[f"{UPLOAD_PREFIX}/{n}"], self.init_lora[n][1].clone()) for n in self.init_lora}
        return ServerUpdate(merge={}, global_lora=self._global)

    def load_state_dict(self, state):
        """The checkpoint's A is the run's: a resumed trainer's own init (peft's, recomputed) must not replace it."""
        super().load_state_dict(state)
        self.init_lora = {n: (self.init_lora[n][0], A.clone()) for n, (_, A) in self._global.items()}
