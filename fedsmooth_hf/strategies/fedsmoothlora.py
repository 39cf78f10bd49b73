"""FedSmoothLoRA (arXiv 2605.29460): Round-Matching + Gradient-Aligned client starts.

Client c in round t (it kept its last upload ``(B_c, A_c)``; the server its last
aggregate ``(B_s, A_s)``, already merged into ``W``):

1. Round-Matching ``W_rm = zeta_t (B_c A_c - B_s A_s)`` (rank <= 2r, kept factored);
2. ``G`` = gradient at the client's real start ``W + s W_rm``;
3. ``(B_ga, A_ga)`` = Gradient-Aligned factors of ``G``;
4. LoRA ``= SVD_r(B_ga A_ga + W_rm)``, frozen offset ``- s B_ga A_ga``;
5. local training; upload ``SVD_r(B A - B_ga A_ga)``.

Server: ``(B_s, A_s) = SVD_r(sum_c (n_c/N) B_c A_c)`` merged into ``W``. Every sum
above is exact in factored form (``lowrank.truncated_svd``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..gradients import GA_ESTIMATORS
from ..lora_init import client_init_factors
from ..lowrank import stack_factors, truncated_svd
from .base import (
    ClientStart,
    Factors,
    FederatedStrategy,
    ModuleFactors,
    ServerUpdate,
    flatten_factors,
    truncated_product_mean,
    unflatten_factors,
)
from .registry import register_strategy

ZETA_MODES = ("constant", "cosine")


def zeta_schedule(round_idx: int, num_rounds: int, zeta: float, mode: str, min_zeta: float) -> float:
    """Round-Matching weight for 0-based ``round_idx``: constant, or cosine from zeta to min_zeta."""
    if mode == "constant":
        return zeta
    if mode == "cosine":
        return min_zeta + 0.5 * (zeta - min_zeta) * (1.0 + math.cos(math.pi * round_idx / num_rounds))
    raise ValueError(f"zeta_mode must be one of {ZETA_MODES}, got '{mode}'")


@register_strategy
class FedSmoothLoRA(FederatedStrategy):
    """FedSmoothLoRA: continuity across rounds (Round-Matching) and client-aware starts (Gradient-Aligned).

    Args:
        rank: LoRA rank r.
        num_rounds: total rounds (for the cosine zeta schedule).
        gamma: stable-scale constant of the Gradient-Aligned factors, ``k = d_out^(1/4)/sqrt(gamma)``.
        zeta: Round-Matching weight (``1.0``: each client resumes its own previous end state).
        zeta_mode: ``"constant"`` or ``"cosine"`` (decays to ``min_zeta``; suggested for non-IID).
        min_zeta: floor of the cosine schedule.
        ga_init: ``False`` is an ablation (the paper's "w/o GA"): no gradient is estimated; a
            client starts from PEFT's plain LoRA init in round 0 and from ``SVD_r(W_rm)``
            afterwards (Round-Matching only), with no frozen offset.
        ga_estimator: how the top-``2r`` gradient subspace is found: ``"sketch"`` (streaming
            randomized sketches, memory ``O((d_in + d_out) r)`` per layer, see ``sketch.py``) or
            ``"dense"`` (the dense gradient of every layer and its SVD, as published).
    """

    name = "fedsmoothlora"
    needs_gradient = True

    def __init__(
        self,
        rank: int,
        num_rounds: int = 1,
        gamma: float = 64.0,
        zeta: float = 1.0,
        zeta_mode: str = "constant",
        min_zeta: float = 0.0,
        ga_init: bool = True,
        ga_estimator: str = "sketch",
    ):
        super().__init__(rank, num_rounds)
        if ga_estimator not in GA_ESTIMATORS:
            raise ValueError(f"ga_estimator must be one of {GA_ESTIMATORS}, got '{ga_estimator}'")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if zeta_mode not in ZETA_MODES:
            raise ValueError(f"zeta_mode must be one of {ZETA_MODES}, got '{zeta_mode}'")
        self.gamma = float(gamma)
        self.zeta = float(zeta)
        self.zeta_mode = zeta_mode
        self.min_zeta = float(min_zeta)
        self.ga_init = bool(ga_init)
        self.ga_estimator = ga_estimator
        self.needs_gradient = self.ga_init  # the trainer skips the gradient pass when False
        self._client_uploads: dict[int, ModuleFactors] = {}
        self._server: ModuleFactors | None = None
        self._ga: dict[int, ModuleFactors] = {}  # per client, between client_start and client_upload

    def current_zeta(self) -> float:
        return zeta_schedule(self.round, self.num_rounds, self.zeta, self.zeta_mode, self.min_zeta)

    def round_matching(self, client: int) -> ModuleFactors | None:
        """``W_rm`` as stacked factors (inner rank 2r), or None when there is nothing to match."""
        zeta = self.current_zeta()
        own = self._client_uploads.get(client)
        if self._server is None or own is None or zeta == 0.0:
            return None
        return {
            name: stack_factors(
                [own[name][0], self._server[name][0]], [own[name][1], self._server[name][1]], [zeta, -zeta]
            )
            for name in self.init_lora
        }

    def gradient_point(self, client: int) -> ModuleFactors | None:
        return self.round_matching(client)

    def gradient_request(self) -> dict:
        """The GA factors need the top ``2r`` singular directions of each layer's gradient."""
        return {"rank": 2 * self.rank, "estimator": self.ga_estimator}

    def client_start(self, client: int, grads: Mapping[str, object] | None = None) -> ClientStart:
        """``grads``: per layer ``G`` or an estimate of it (``.top_singular``); see ``gradient_request``."""
        if not self.ga_init:
            return self._round_matching_only_start(client)
        if grads is None:
            raise ValueError("fedsmoothlora needs the clients' weight gradients (ga_samples > 0)")
        missing = sorted(set(self.init_lora) - set(grads))
        if missing:
            raise ValueError(f"no gradient was estimated for modules {missing[:5]}")
        rm = self.round_matching(client)
        lora, offsets, ga = {}, {}, {}
        for name in self.init_lora:
            (B, A), (B_ga, A_ga) = client_init_factors(
                grads[name], self.rank, self.gamma, None if rm is None else rm[name]
            )
            lora[name] = (B, A)
            offsets[name] = (-B_ga, A_ga)
            ga[name] = (B_ga.float().cpu(), A_ga.float().cpu())
        self._ga[client] = ga
        return ClientStart(lora=lora, offsets=offsets)

    def _round_matching_only_start(self, client: int) -> ClientStart:
        """The ``ga_init=False`` ablation: LoRA = ``SVD_r(W_rm)``, or PEFT's init when there is no ``W_rm``."""
        rm = self.round_matching(client)
        if rm is None:
            lora = {n: (B.clone(), A.clone()) for n, (B, A) in self.init_lora.items()}
        else:
            lora = {n: truncated_svd([B], [A], self.rank) for n, (B, A) in rm.items()}
        self._ga[client] = None
        return ClientStart(lora=lora)

    def client_upload(self, client: int, trained: Mapping[str, Factors]) -> ModuleFactors:
        if client not in self._ga:
            raise RuntimeError(f"client_upload for client {client} without a matching client_start")
        ga = self._ga.pop(client)
        if ga is None:  # ga_init=False: nothing to subtract, the adapter is the change relative to W
            upload = {n: truncated_svd([B.float().cpu()], [A.float().cpu()], self.rank) for n, (B, A) in trained.items()}
            self._client_uploads[client] = upload
            return upload
        upload = {}
        for name, (B, A) in trained.items():
            B_ga, A_ga = ga[name]
            upload[name] = truncated_svd(
                [B.float().cpu(), B_ga], [A.float().cpu(), A_ga], self.rank, [1.0, -1.0]
            )
            if not (torch.isfinite(upload[name][0]).all() and torch.isfinite(upload[name][1]).all()):
                # not recorded: a non-finite upload would poison this client's next Round-Matching start
                raise ValueError(f"client {client}: the upload of module '{name}' is non-finite")
        self._client_uploads[client] = upload
        return upload

    def remember_upload(self, client: int, upload: ModuleFactors) -> None:
        self._client_uploads[client] = upload

    def aggregate(self, uploads: Mapping[int, ModuleFactors], weights: Mapping[int, float]) -> ServerUpdate:
        w = self._validated(uploads, weights)
        self._server = truncated_product_mean(uploads, w, self.rank)
        return ServerUpdate(merge=self._server, global_lora=None)

    def receive_update(self, update: ServerUpdate) -> None:
        """The server's aggregate ``(B_s, A_s)`` is the merged update: Round-Matching reads it."""
        self._server = {n: (B.clone(), A.clone()) for n, (B, A) in update.merge.items()}

    # -- persistence -----------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        if self._server is not None:
            state.update(flatten_factors("server", self._server))
        for c, up in self._client_uploads.items():
            state.update(flatten_factors(f"client{c}", up))
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        server = unflatten_factors("server", state)
        self._server = server or None
        clients = {int(k.split("/", 1)[0][len("client") :]) for k in state if k.startswith("client")}
        self._client_uploads = {c: unflatten_factors(f"client{c}", state) for c in sorted(clients)}
        self._ga = {}

    def client_state_bytes(self) -> int:
        return sum(
            B.numel() * B.element_size() + A.numel() * A.element_size()
            for up in self._client_uploads.values()
            for B, A in up.values()
        )

    def describe(self) -> dict:
        return {
            **super().describe(),
            "gamma": self.gamma,
            "zeta": self.zeta,
            "zeta_mode": self.zeta_mode,
            "min_zeta": self.min_zeta,
            "ga_init": self.ga_init,
            "ga_estimator": self.ga_estimator,
        }
