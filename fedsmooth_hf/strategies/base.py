"""The common interface every federated LoRA algorithm implements.

A strategy is pure math over per-module LoRA factors; it knows nothing about
``Trainer``, PEFT or devices. One round (``rounds.RoundEngine``), with ``S`` the strategy::

    S.begin_round(round_idx)
    for client in sampled:                              # an executor, FederatedTrainer.train_client_round
        point = S.gradient_point(client)                # only if S.needs_gradient
        grads = <estimates of dL/dW at W + s * point,   # trainer + gradients.py, sized by
                 one per layer>                         #   S.gradient_request()
        start = S.client_start(client, grads)           # LoRA init, frozen offset, what trains
        trained = <local Trainer steps>                 # trainer
        upload = S.client_upload(client, trained)
    update = S.aggregate({client: upload}, {client: n_examples})
    <W += s * update.merge; adapter of the global model = update.global_lora>   # merge.py

Factors are ``(B, A)`` pairs keyed by module name, in LoRA units: a module's
weight moves by ``s * B @ A`` where ``s`` is PEFT's LoRA scaling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..math.factors import UPLOAD_PREFIX, Factors, ModuleFactors, flatten_factors, unflatten_factors
from ..math.lowrank import factored_norm, pad_factors, stack_factors, truncate_factors, truncated_svd

__all__ = ["UPLOAD_PREFIX", "Factors", "ModuleFactors", "StrategyOptionError", "ClientStart", "ServerUpdate",
           "FederatedStrategy", "GlobalAdapterStrategy", "flatten_factors",
           "unflatten_factors", "normalize_weights", "check_upload", "weighted_factor_mean", "product_sum",
           "truncated_product_mean"]



class StrategyOptionError(ValueError):
    """An option a strategy was given is invalid; ``option`` names it (as ``FederatedArguments`` spells it)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


@dataclass
class ClientStart:
    """How a client's adapter looks when its local training begins.

    Attributes:
        lora: trainable adapter factors ``name -> (B, A)``.
        offsets: frozen low-rank corrections ``name -> (B_off, A_off)`` added to the
            layer as ``s * B_off @ A_off`` for the duration of the client round.
        train_A / train_B: which LoRA factors receive gradients (FFA-LoRA freezes A).
    """

    lora: ModuleFactors
    offsets: ModuleFactors = field(default_factory=dict)
    train_A: bool = True
    train_B: bool = True


@dataclass
class ServerUpdate:
    """What the server does with one round's uploads.

    Attributes:
        merge: factors added into the base weights, ``W += s * B @ A`` (exact, any rank).
        global_lora: the adapter of the new global model, or ``None`` for a zero
            adapter (everything already merged into the base).
        round: 0-based round that produced it (``None``: the receiver's current round).
            A client that skipped rounds needs to know which aggregates it missed.
    """

    merge: ModuleFactors
    global_lora: ModuleFactors | None
    round: int | None = None

    def merge_norm(self) -> float:
        """``sqrt(sum ||B A||_F^2)`` over the merged modules, from the factors (the round record's size of a merge)."""
        return math.sqrt(sum(factored_norm([B], [A]) ** 2 for B, A in self.merge.values()))


def normalize_weights(weights: Mapping[int, float]) -> dict[int, float]:
    """Client weights ``n_c / N``; rejects empty, negative, non-finite or all-zero input."""
    if not weights:
        raise ValueError("aggregate: the list of client uploads is empty; at least one client must report")
    for client, w in weights.items():
        if not math.isfinite(w) or w < 0:
            raise ValueError(
                f"aggregate: client {client} has invalid weight {w}; weights must be finite and >= 0"
            )
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError(f"aggregate: client weights must sum to > 0, got {total}")
    return {c: float(w) / total for c, w in weights.items()}


def check_upload(client: int, upload: Mapping[str, Factors], expected: Mapping[str, Factors]) -> None:
    """One clear error for an upload that is missing modules, misshapen or non-finite."""
    missing = sorted(set(expected) - set(upload))
    if missing:
        raise ValueError(f"upload of client {client} is missing modules: {missing[:5]}")
    for name, (B, A) in upload.items():
        if name not in expected:
            raise ValueError(f"upload of client {client} has an unknown module '{name}'")
        eB, eA = expected[name]
        k = B.shape[1] if B.dim() == 2 else -1  # a client of a smaller rank uploads k <= r components
        if (B.dim() != 2 or A.dim() != 2 or B.shape[0] != eB.shape[0] or tuple(A.shape) != (k, eA.shape[1])
                or not 1 <= k <= eB.shape[1]):
            raise ValueError(
                f"upload of client {client}, module '{name}': shapes B{tuple(B.shape)} A{tuple(A.shape)}, "
                f"expected B{tuple(eB.shape)} A{tuple(eA.shape)} (or a smaller inner rank)"
            )
        if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
            raise ValueError(f"upload of client {client}, module '{name}' contains NaN or Inf")


def weighted_factor_mean(uploads: Mapping[int, ModuleFactors], weights: Mapping[int, float]) -> ModuleFactors:
    """``(sum_c w_c B_c, sum_c w_c A_c)`` per module: FedAvg of the factors separately."""
    clients = list(uploads)
    names = uploads[clients[0]].keys()
    return {
        name: (
            sum(weights[c] * uploads[c][name][0] for c in clients),
            sum(weights[c] * uploads[c][name][1] for c in clients),
        )
        for name in names
    }


def product_sum(
    uploads: Mapping[int, ModuleFactors],
    weights: Mapping[int, float],
    extra: Mapping[str, Factors] | None = None,
    extra_weight: float = 1.0,
) -> ModuleFactors:
    """Exact factored ``sum_c w_c B_c A_c`` (+ ``extra_weight * B_x A_x``) per module, no truncation."""
    clients = list(uploads)
    out = {}
    for name in uploads[clients[0]]:
        Bs = [uploads[c][name][0] for c in clients]
        As = [uploads[c][name][1] for c in clients]
        ws = [weights[c] for c in clients]
        if extra is not None:
            Bs.append(extra[name][0])
            As.append(extra[name][1])
            ws.append(extra_weight)
        out[name] = stack_factors(Bs, As, ws)
    return out


def truncated_product_mean(
    uploads: Mapping[int, ModuleFactors], weights: Mapping[int, float], rank: int
) -> ModuleFactors:
    """``SVD_r(sum_c w_c B_c A_c)`` per module: the full-rank aggregate projected to rank r, exactly."""
    clients = list(uploads)
    return {
        name: truncated_svd(
            [uploads[c][name][0] for c in clients],
            [uploads[c][name][1] for c in clients],
            rank,
            [weights[c] for c in clients],
        )
        for name in uploads[clients[0]]
    }


class FederatedStrategy:
    """Base class: holds the initial adapter and implements the shared bookkeeping.

    Subclasses set ``name`` and override :meth:`client_start`, :meth:`client_upload`
    and :meth:`aggregate`; stateful ones also :meth:`state_dict` / :meth:`load_state_dict`
    and :meth:`client_state_bytes`.
    """

    name: str = ""
    #: whether :meth:`client_start` needs the full-weight gradient of each target layer
    needs_gradient: bool = False
    #: what a server optimizer steps (``server_optim``): ``"factors"`` when the global model is an
    #: adapter whose factors are averaged, ``"product"`` when a round moves it by a low-rank product
    server_space: str = "product"
    #: what a client contributes under client-level DP (``engine.privacy``): ``"factors"`` (named
    #: tensors the server averages) and/or ``"product"`` (per module ``B A``, released by the sketch)
    dp_forms: tuple[str, ...] = ("product",)
    #: the dataclass of this algorithm's own options (``None``: none beyond rank and rounds); an
    #: instance travels in ``FederatedLoraConfig`` (see ``fedsmooth_hf.trainer.lora_config``)
    config_class: type | None = None
    #: whether a run may start from peft's ``init_lora_weights`` (PiSSA, LoRA-GA, ...): only where every client
    #: starts each round from the one shared adapter that init becomes at round 0 (``trainer.lora_config``)
    accepts_peft_init: bool = False

    def __init__(self, rank: int, num_rounds: int = 1):
        if rank < 1:
            raise StrategyOptionError("lora_r", f"lora_r must be >= 1, got {rank}")
        if num_rounds < 1:
            raise StrategyOptionError("num_rounds", f"num_rounds must be >= 1, got {num_rounds}")
        self.rank = rank
        self.num_rounds = num_rounds
        self.round = 0
        self.init_lora: ModuleFactors = {}
        self._client_ranks: dict[int, int] = {}  # heterogeneous ranks; absent = self.rank

    # -- lifecycle -------------------------------------------------------------------
    def setup(self, init_lora: Mapping[str, Factors]) -> None:
        """Receive the adapter's initial factors (PEFT's init), the round-0 global adapter."""
        if not init_lora:
            raise ValueError("setup: no LoRA modules were given (do the target modules match anything?)")
        self.init_lora = {n: (B.detach().cpu().clone(), A.detach().cpu().clone()) for n, (B, A) in init_lora.items()}

    def set_client_ranks(self, ranks: Mapping[int, int] | Sequence[int]) -> None:
        """Heterogeneous ranks (``client_rank.py``): client ``c`` starts, trains and uploads rank ``ranks[c]``."""
        ranks = ranks if isinstance(ranks, Mapping) else dict(enumerate(ranks))
        bad = sorted({r for r in ranks.values() if not 1 <= r <= self.rank})
        if bad:
            raise StrategyOptionError("client_ranks",
                                      f"every client rank must lie in [1, lora_r={self.rank}], got {bad}")
        self._client_ranks = {c: int(r) for c, r in ranks.items() if r != self.rank}

    def client_rank(self, client: int) -> int:
        """The adapter rank client ``client`` trains (``rank`` unless set otherwise)."""
        return self._client_ranks.get(client, self.rank)

    def _at_client_rank(self, client: int, factors: ModuleFactors) -> ModuleFactors:
        """HetLoRA's truncation: the leading ``client_rank`` components of ``factors``."""
        k = self.client_rank(client)
        return factors if k == self.rank else truncate_factors(factors, k)

    def begin_round(self, round_idx: int) -> None:
        """Called once before the clients of round ``round_idx`` (0-based) start."""
        self.round = round_idx

    def client_metrics(self, client: int) -> dict:
        """Figures of ``client``'s start in this round (plain lists and numbers), sent with its upload
        so the server's :meth:`round_metrics` sees every client wherever it trained; none by default."""
        return {}

    def round_metrics(self, client_metrics: Mapping[int, dict] | None = None) -> dict[str, float]:
        """Figures of the round just run, for its record (e.g. the Round-Matching weight); none by default.

        ``client_metrics``: every uploading client's :meth:`client_metrics`; None: the clients
        this instance started itself in the round.
        """
        return {}

    # -- client side -----------------------------------------------------------------
    def gradient_point(self, client: int) -> ModuleFactors | None:
        """Low-rank offset (LoRA units) added to the global model where the client's gradient is taken; None = none."""
        return None

    def gradient_request(self) -> dict:
        """How :meth:`client_start` wants the gradients estimated (keywords of
        ``gradients.estimate_gradient_subspaces``: ``rank``, ``estimator``)."""
        return {"estimator": "dense"}

    def calibration(self) -> tuple[int, int]:
        """``(examples, batch size)`` of the client's gradient pass (only when :attr:`needs_gradient`)."""
        return 0, 1

    def client_start(self, client: int, grads: Mapping[str, object] | None = None) -> ClientStart:
        """The client's starting point. ``grads``: per layer, the dense gradient or an estimate
        of it with ``.shape`` and ``.top_singular(q)`` (only when :attr:`needs_gradient`)."""
        raise NotImplementedError

    def client_upload(self, client: int, trained: Mapping[str, Factors]) -> ModuleFactors:
        """What the client sends after training; by default its trained factors."""
        return {n: (B.detach().float().cpu(), A.detach().float().cpu()) for n, (B, A) in trained.items()}

    def encode_upload(self, client: int, upload: ModuleFactors) -> dict[str, torch.Tensor]:
        """What of ``client``'s upload travels to the server: flat tensors under the factor codec
        (``lora/<module>/B`` and ``.../A``). Both factors by default; a strategy whose server
        already knows part of the upload sends less (FFA-LoRA: only ``B``)."""
        return flatten_factors(UPLOAD_PREFIX, upload)

    def decode_upload(self, client: int, wire: Mapping[str, torch.Tensor]) -> ModuleFactors:
        """Inverse of :meth:`encode_upload` on the server: the upload's factors."""
        return unflatten_factors(UPLOAD_PREFIX, wire)

    def remember_upload(self, client: int, upload: ModuleFactors) -> None:
        """Record an upload computed by another process (client-parallel rounds); stateless strategies ignore it."""

    # -- server side -----------------------------------------------------------------
    def aggregate(self, uploads: Mapping[int, ModuleFactors], weights: Mapping[int, float]) -> ServerUpdate:
        raise NotImplementedError

    def global_lora(self) -> ModuleFactors | None:
        """The adapter of the current global model (``None`` = zero adapter)."""
        return None

    def receive_update(self, update: ServerUpdate) -> None:
        """Client side of a federation: adopt the server state that ``update`` carries.

        When server and clients are separate processes (``fedsmooth_hf.flower``), a
        client's strategy never runs :meth:`aggregate`; this gives it the part of the
        server's state its next :meth:`client_start` reads. Stateless by default.
        """

    def _validated(
        self, uploads: Mapping[int, ModuleFactors], weights: Mapping[int, float]
    ) -> dict[int, float]:
        w = normalize_weights({c: weights[c] for c in uploads} if uploads else {})
        for c, up in uploads.items():
            check_upload(c, up, self.init_lora)
        return w

    # -- client-level DP -------------------------------------------------------------
    def dp_contribution(self, client: int | None, upload: ModuleFactors, form: str):
        """The part of ``client``'s upload of ``form`` (one of :attr:`dp_forms`) that is clipped and summed:
        the upload's factors by default (products: ``module -> (B, A)``; ``"factors"``: flat named tensors)."""
        if form == "factors":
            return flatten_factors(UPLOAD_PREFIX, upload)
        return upload

    def aggregate_released(self, released: Mapping[str, object]) -> ServerUpdate:
        """:meth:`aggregate` on the noisy means DP releases instead of the uploads: ``released["factors"]``
        (flat named tensors) and/or ``released["product"]`` (``module -> (Q, Z)``, the mean ``Q Z``)."""
        raise NotImplementedError(f"strategy '{self.name}' has no aggregate of released means (client-level DP)")

    # -- persistence -----------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (flat names), beyond the initial adapter the trainer saves."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""

    def client_state_bytes(self) -> int:
        """Bytes of per-client state held on the server side of the simulation."""
        return 0

    def describe(self) -> dict:
        """Hyper-parameters for logs, checkpoints and model cards."""
        return {"strategy": self.name, "rank": self.rank, "num_rounds": self.num_rounds}

    def directions_per_layer(self) -> int:
        """How many singular directions of a layer this algorithm takes (``rank``; FedSmoothLoRA's
        Gradient-Aligned start takes ``2 * rank``): each layer needs at least that many."""
        return self.rank

    def check_layer_shapes(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """One clear error for a layer ``name -> (d_out, d_in)`` too small for :meth:`directions_per_layer`."""
        need = self.directions_per_layer()
        times = "" if need == self.rank else f"{need // self.rank} * "
        for name, (d_out, d_in) in shapes.items():
            if need > min(d_out, d_in):
                raise ValueError(
                    f"lora_r={self.rank} is too large for layer '{name}' ({d_out}x{d_in}): "
                    f"{times}lora_r must be <= {min(d_out, d_in)}"
                )

    def card_fields(self) -> dict:
        """Rows for the model card: ``strategy`` and the options in force that shape this algorithm."""
        return {"strategy": self.name}

    def summary(self) -> str:
        """:meth:`describe` on one line, for run summaries: the values in force, defaults resolved."""
        return ", ".join(f"{k}={v}" for k, v in self.describe().items())


class GlobalAdapterStrategy(FederatedStrategy):
    """Strategies whose global model keeps an adapter ``(B_g, A_g)`` that clients start from.

    The global adapter starts as PEFT's initial one; :meth:`aggregate` replaces it.
    """

    def setup(self, init_lora: Mapping[str, Factors]) -> None:
        super().setup(init_lora)
        self._global: ModuleFactors = {n: (B.clone(), A.clone()) for n, (B, A) in self.init_lora.items()}

    def client_start(self, client: int, grads: Mapping[str, object] | None = None) -> ClientStart:
        return ClientStart(lora=self._at_client_rank(client, self._global))

    def _padded(self, uploads: Mapping[int, ModuleFactors]) -> Mapping[int, ModuleFactors]:
        """Uploads of smaller rank zero-padded to ``rank`` (HetLoRA), so factors can be averaged."""
        if all(B.shape[1] == self.rank for up in uploads.values() for B, _ in up.values()):
            return uploads
        return {c: pad_factors(up, self.rank) for c, up in uploads.items()}

    def global_lora(self) -> ModuleFactors:
        return self._global

    def dp_contribution(self, client, upload, form):
        """A client of a smaller rank contributes its factors zero-padded to ``rank`` (as they are averaged)."""
        if form == "factors":
            return flatten_factors(UPLOAD_PREFIX, self._padded({0: upload})[0])
        return upload

    def receive_update(self, update: ServerUpdate) -> None:
        if update.global_lora is None:
            raise ValueError(f"{self.name}: the server update carries no global adapter")
        self._global = {n: (B.clone(), A.clone()) for n, (B, A) in update.global_lora.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return flatten_factors("global", self._global)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._global = unflatten_factors("global", state)
