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

The paper runs every client every round. A client whose last upload is ``k > 1``
rounds old is outside it; ``stale_round_matching`` says what it starts from:

* ``continuity`` (default): its own old end state, ``W_rm = zeta (B_c A_c - sum of the
  aggregates merged since)``, exact in factored form, truncated to rank 2r;
* ``reset``: no Round-Matching, the current global model (as a first-time client);
* ``paper``: the published formula as is, ``zeta (B_c A_c - B_s A_s)`` with the latest
  aggregate (neither the old end state nor the global model).

With ``k = 1`` (always, under full participation) the three are the same number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import torch

from ...math.gradient_aligned import client_init_factors
from ...math.lowrank import factored_norm, stack_factors, truncated_svd
from ..base import (
    ClientStart,
    Factors,
    FederatedStrategy,
    ModuleFactors,
    ServerUpdate,
    flatten_factors,
    truncated_product_mean,
    unflatten_factors,
)
from ..registry import register_strategy
from .config import ZETA_MODES, FedSmoothLoRAConfig


def resolve_zeta_mode(mode: str, iid_data: bool | None) -> str:
    """``auto``: ``constant`` on an IID split, ``cosine`` otherwise (the authors' advice).

    ``iid_data=None`` (heterogeneity unknown, e.g. user-given client datasets) is
    treated as non-IID: a decaying zeta is the safe choice there. ``mode`` is checked by
    :class:`FedSmoothLoRAConfig`.
    """
    if mode != "auto":
        return mode
    return "constant" if iid_data else "cosine"


def zeta_schedule(round_idx: int, num_rounds: int, zeta: float, mode: str, min_zeta: float) -> float:
    """Round-Matching weight for 0-based ``round_idx``: constant, or cosine from zeta to min_zeta."""
    if mode == "constant":
        return zeta
    if mode == "cosine":
        return min_zeta + 0.5 * (zeta - min_zeta) * (1.0 + math.cos(math.pi * round_idx / num_rounds))
    raise ValueError(f"zeta_mode must be one of {ZETA_MODES[1:]} once resolved, got '{mode}'")


def _share_kept(B, A, B_ga, A_ga, rm: Factors) -> float:
    """``1 - ||(B A - B_ga A_ga) - W_rm|| / ||W_rm||``, in factored form."""
    B_rm, A_rm = (t.to(B.dtype) for t in rm)
    size = factored_norm([B_rm], [A_rm])
    if size == 0.0:
        return 1.0
    return 1.0 - factored_norm([B, B_ga, B_rm], [A, A_ga, A_rm], [1.0, -1.0, -1.0]) / size


@register_strategy
class FedSmoothLoRA(FederatedStrategy):
    """FedSmoothLoRA: continuity across rounds (Round-Matching) and client-aware starts (Gradient-Aligned).

    Args:
        rank: LoRA rank r.
        num_rounds: total rounds (for the cosine zeta schedule).
        config: the method's options (:class:`FedSmoothLoRAConfig`; its docstring and
            docs/method.md say what each does). ``exact_round_matching`` is a variant (not the
            paper's): LoRA starts at the GA factors and the whole ``W_rm`` joins the frozen
            offset, ``- s B_ga A_ga + s W_rm``, so a client starts exactly at ``W + s W_rm``
            and uploads ``SVD_r(B A - B_ga A_ga + W_rm)``. ``ga_init=False`` is the paper's
            "w/o GA" ablation: no gradient pass; PEFT's init in round 0, ``SVD_r(W_rm)`` afterwards.
        iid_data: whether the clients' data is an IID split (``None``: unknown); read by
            ``zeta_mode="auto"``.
        **options: fields of :class:`FedSmoothLoRAConfig` given one by one (they override ``config``).
    """

    name = "fedsmoothlora"
    needs_gradient = True
    config_class = FedSmoothLoRAConfig

    def __init__(self, rank: int, num_rounds: int = 1, config: FedSmoothLoRAConfig | None = None,
                 iid_data: bool | None = None, **options):
        super().__init__(rank, num_rounds)
        unknown = sorted(set(options) - set(FedSmoothLoRAConfig.__dataclass_fields__))
        if unknown:
            raise TypeError(f"FedSmoothLoRA got unknown options {unknown}; see FedSmoothLoRAConfig")
        self.config = replace(config or FedSmoothLoRAConfig(), **options)  # validated by the config itself
        c = self.config
        self.gamma, self.zeta, self.min_zeta = float(c.gamma), float(c.zeta), float(c.min_zeta)
        self.requested_zeta_mode = c.zeta_mode
        self.zeta_mode = resolve_zeta_mode(c.zeta_mode, iid_data)
        self.stale_round_matching = c.stale_round_matching
        self.exact_round_matching = bool(c.exact_round_matching)
        self.ga_init = bool(c.ga_init)
        self.ga_estimator = c.ga_estimator
        self.needs_gradient = self.ga_init  # the trainer skips the gradient pass when False
        self._client_uploads: dict[int, ModuleFactors] = {}
        self._upload_round: dict[int, int | None] = {}  # round of each client's last upload (None: unknown)
        self._server: ModuleFactors | None = None
        self._merged: dict[int, ModuleFactors] = {}  # aggregates by round, since the stalest upload (continuity)
        self._offsets: dict[int, ModuleFactors | None] = {}  # frozen offsets, between client_start and upload
        self._rm_kept: dict[int, list[float]] = {}  # this round's share of W_rm kept, per client and layer

    def current_zeta(self) -> float:
        return zeta_schedule(self.round, self.num_rounds, self.zeta, self.zeta_mode, self.min_zeta)

    def begin_round(self, round_idx: int) -> None:
        super().begin_round(round_idx)
        self._rm_kept = {}

    def client_metrics(self, client: int) -> dict:
        """``rm_kept``: per layer, the share of ``W_rm`` this client's start kept (see :meth:`round_metrics`)."""
        return {"rm_kept": list(self._rm_kept.get(client, []))}

    def round_metrics(self, client_metrics: Mapping[int, dict] | None = None) -> dict[str, float]:
        """``zeta`` of the round and, when clients were matched, ``rm_kept_median``.

        ``rm_kept = 1 - ||start - W_rm|| / ||W_rm||`` per layer, with ``start`` the displacement the
        rank-r LoRA init really gives (``SVD_r(B_ga A_ga + W_rm) - B_ga A_ga``): 1 when the client
        starts exactly at ``W + s W_rm``; lower when the truncation drops part of ``W_rm`` (rank 2r).
        """
        out = {"zeta": float(self.current_zeta())}
        if client_metrics is None:
            client_metrics = {c: self.client_metrics(c) for c in self._rm_kept}
        kept = [v for m in client_metrics.values() for v in m.get("rm_kept", [])]
        if kept:
            out["rm_kept_median"] = float(torch.tensor(kept).median())
        return out

    def round_matching(self, client: int) -> ModuleFactors | None:
        """``W_rm`` as stacked factors (inner rank 2r), or None when there is nothing to match."""
        zeta = self.current_zeta()
        own = self._client_uploads.get(client)
        if self._server is None or own is None or zeta == 0.0:
            return None
        at = self._upload_round.get(client)
        missed = 1 if at is None else self.round - at  # aggregates merged since its upload
        if missed <= 1 or self.stale_round_matching == "paper":
            return {
                name: stack_factors(
                    [own[name][0], self._server[name][0]], [own[name][1], self._server[name][1]], [zeta, -zeta]
                )
                for name in self.init_lora
            }
        if self.stale_round_matching == "reset":
            return None
        since = range(self._upload_round[client], self.round)
        absent = [j for j in since if j not in self._merged]
        if absent:
            raise RuntimeError(f"client {client}: the aggregates of rounds {absent} it missed were not kept")
        return {
            name: truncated_svd(
                [own[name][0], *(self._merged[j][name][0] for j in since)],
                [own[name][1], *(self._merged[j][name][1] for j in since)],
                2 * self.rank,
                [zeta] + [-zeta] * len(since),
            )
            for name in self.init_lora
        }

    def gradient_point(self, client: int) -> ModuleFactors | None:
        return self.round_matching(client)

    def gradient_request(self) -> dict:
        """The GA factors need the top ``2r`` singular directions of each layer's gradient."""
        return {"rank": 2 * self.rank, "estimator": self.ga_estimator}

    def calibration(self) -> tuple[int, int]:
        return self.config.ga_samples, self.config.ga_batch_size

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
        rank = self.client_rank(client)
        lora, offsets = {}, {}
        kept = self._rm_kept[client] = []
        for name in self.init_lora:
            if rm is not None and self.exact_round_matching:
                # LoRA at the GA factors; the whole W_rm in the frozen offset, nothing truncated
                _, (B_ga, A_ga) = client_init_factors(grads[name], rank, self.gamma, None)
                B_rm, A_rm = (t.to(device=B_ga.device, dtype=B_ga.dtype) for t in rm[name])
                lora[name] = (B_ga.clone(), A_ga.clone())
                offsets[name] = (torch.cat([-B_ga, B_rm], dim=1), torch.cat([A_ga, A_rm], dim=0))
                kept.append(1.0)
                continue
            (B, A), (B_ga, A_ga) = client_init_factors(
                grads[name], rank, self.gamma, None if rm is None else rm[name]
            )
            if rm is not None:
                kept.append(_share_kept(B, A, B_ga, A_ga, rm[name]))
            lora[name] = (B, A)
            offsets[name] = (-B_ga, A_ga)
        # the upload is the change relative to W: trained adapter + frozen offset
        self._offsets[client] = {n: (B.float().cpu(), A.float().cpu()) for n, (B, A) in offsets.items()}
        return ClientStart(lora=lora, offsets=offsets)

    def _round_matching_only_start(self, client: int) -> ClientStart:
        """The ``ga_init=False`` ablation: LoRA = ``SVD_r(W_rm)``, or PEFT's init when there is no ``W_rm``."""
        rm = self.round_matching(client)
        if rm is None:
            lora = self._at_client_rank(client, {n: (B.clone(), A.clone()) for n, (B, A) in self.init_lora.items()})
        else:
            lora = {n: truncated_svd([B], [A], self.client_rank(client)) for n, (B, A) in rm.items()}
        self._offsets[client] = None
        return ClientStart(lora=lora)

    def client_upload(self, client: int, trained: Mapping[str, Factors]) -> ModuleFactors:
        if client not in self._offsets:
            raise RuntimeError(f"client_upload for client {client} without a matching client_start")
        offsets = self._offsets.pop(client)
        rank = self.client_rank(client)
        if offsets is None:  # ga_init=False: no offset, the adapter is the change relative to W
            upload = {n: truncated_svd([B.float().cpu()], [A.float().cpu()], rank) for n, (B, A) in trained.items()}
            self.remember_upload(client, upload)
            return upload
        upload = {}
        for name, (B, A) in trained.items():
            B_off, A_off = offsets[name]
            upload[name] = truncated_svd([B.float().cpu(), B_off], [A.float().cpu(), A_off], rank)
            if not (torch.isfinite(upload[name][0]).all() and torch.isfinite(upload[name][1]).all()):
                # not recorded: a non-finite upload would poison this client's next Round-Matching start
                raise ValueError(f"client {client}: the upload of module '{name}' is non-finite")
        self.remember_upload(client, upload)
        return upload

    def remember_upload(self, client: int, upload: ModuleFactors) -> None:
        self._client_uploads[client] = upload
        self._upload_round[client] = self.round

    def aggregate(self, uploads: Mapping[int, ModuleFactors], weights: Mapping[int, float]) -> ServerUpdate:
        w = self._validated(uploads, weights)
        self._server = truncated_product_mean(uploads, w, self.rank)
        return ServerUpdate(merge=self._server, global_lora=None, round=self.round)

    def aggregate_released(self, released) -> ServerUpdate:
        """Under DP: ``(B_s, A_s) = SVD_r`` of the released mean product ``Q Z``, merged as usual."""
        self._server = {n: truncated_svd([Q], [Z], self.rank) for n, (Q, Z) in released["product"].items()}
        return ServerUpdate(merge=self._server, global_lora=None, round=self.round)

    def receive_update(self, update: ServerUpdate) -> None:
        """The server's aggregate ``(B_s, A_s)`` is the merged update: Round-Matching reads it."""
        self._server = {n: (B.clone(), A.clone()) for n, (B, A) in update.merge.items()}
        if self.stale_round_matching == "continuity":
            self._merged[self.round if update.round is None else update.round] = self._server
            oldest = min((at for at in self._upload_round.values() if at is not None), default=None)
            self._merged = {j: f for j, f in self._merged.items() if oldest is not None and j >= oldest}

    # -- persistence -----------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``server``, ``client<c>@<round of its upload>`` and (continuity) ``merged<round>`` factors."""
        state = {}
        if self._server is not None:
            state.update(flatten_factors("server", self._server))
        for c, up in self._client_uploads.items():
            at = self._upload_round.get(c)
            state.update(flatten_factors(f"client{c}" if at is None else f"client{c}@{at}", up))
        for j, agg in self._merged.items():  # the latest is also ``server``: safetensors wants unshared storage
            state.update(flatten_factors(f"merged{j}", {n: (B.clone(), A.clone()) for n, (B, A) in agg.items()}))
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        prefixes = {k.split("/", 1)[0] for k in state}
        server = unflatten_factors("server", state)
        self._server = server or None
        self._client_uploads, self._upload_round, self._merged = {}, {}, {}
        for prefix in sorted(prefixes):
            if prefix.startswith("client"):
                client, _, at = prefix[len("client"):].partition("@")
                self._client_uploads[int(client)] = unflatten_factors(prefix, state)
                # checkpoints written before upload rounds were kept: treated as last round's upload
                self._upload_round[int(client)] = int(at) if at else None
            elif prefix.startswith("merged"):
                self._merged[int(prefix[len("merged"):])] = unflatten_factors(prefix, state)
        self._offsets = {}

    def client_state_bytes(self) -> int:
        return sum(
            B.numel() * B.element_size() + A.numel() * A.element_size()
            for up in self._client_uploads.values()
            for B, A in up.values()
        )

    def directions_per_layer(self) -> int:
        """The Gradient-Aligned start takes singular directions r..2r of each layer's gradient."""
        return 2 * self.rank if self.needs_gradient else self.rank

    def card_fields(self) -> dict:
        """The GA and Round-Matching options in force; ``zeta_mode`` says when ``auto`` chose it."""
        zeta_mode = self.zeta_mode
        if self.requested_zeta_mode != zeta_mode:
            zeta_mode = f"{zeta_mode} (zeta_mode={self.requested_zeta_mode})"
        fields = {"strategy": self.name}
        if self.needs_gradient:
            fields["ga_samples"] = self.config.ga_samples
        fields.update(gamma=self.gamma, zeta=self.zeta, zeta_mode=zeta_mode, min_zeta=self.min_zeta,
                      stale_round_matching=self.stale_round_matching)
        return fields

    def describe(self) -> dict:
        return {
            **super().describe(),
            "gamma": self.gamma,
            "zeta": self.zeta,
            "zeta_mode": self.zeta_mode,
            "zeta_mode_requested": self.requested_zeta_mode,
            "min_zeta": self.min_zeta,
            "ga_init": self.ga_init,
            "stale_round_matching": self.stale_round_matching,
            "exact_round_matching": self.exact_round_matching,
            "ga_estimator": self.ga_estimator,
            "ga_samples": self.config.ga_samples,
            "ga_batch_size": self.config.ga_batch_size,
        }
