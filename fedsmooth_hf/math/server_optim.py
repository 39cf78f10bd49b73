"""Server optimizers: treat a round's aggregate as a pseudo-gradient (FedOpt, Reddi et al., 2021).

Plain aggregation sets the global model to the clients' average. A server optimizer
instead takes ``Delta_t = aggregate - current`` as a step direction and moves the
global model by an optimizer's update of it::

    avgm     m = beta m + Delta                          x += lr * m   (FedAvgM, Hsu et al.)
    adam     m = b1 m + (1-b1) Delta;  v = b2 v + (1-b2) Delta^2         x += lr * m / (sqrt(v) + tau)
    yogi     m as adam;                v = v - (1-b2) Delta^2 sign(v - Delta^2)   (same step)
    adagrad  m as adam;                v = v + Delta^2                    (same step)

with ``m = v = 0`` before the first round. Where ``x`` lives depends on the strategy
(:attr:`~fedsmooth_hf.strategies.base.FederatedStrategy.server_space`):

* ``"factors"`` (FedIT, FFA-LoRA): the global model is an adapter whose factors are
  averaged; ``x`` are those factors and every optimizer works element-wise, as in the
  peers' implementations.
* ``"product"`` (FlexLoRA, FRLoRA, FedEx-LoRA, FedSmoothLoRA): a round moves the model by
  a low-rank product ``D_t`` (merged delta plus the change of the global adapter). The
  state must stay factored, so only ``avgm`` exists here, its momentum kept at the
  adapter's rank: ``M_t = SVD_r(beta M_{t-1} + D_t)``; the model moves by ``lr * M_t``
  instead of ``D_t``. At rank r the momentum is stored like any adapter, and
  FedSmoothLoRA's Round-Matching reads the step actually merged (``lr * M_t``) as the
  server's aggregate. FRLoRA merges up to rank ``K r`` a round; its momentum keeps the
  top r directions. An element-wise ``v`` of a product is a dense
  ``d_out x d_in`` matrix per layer, the memory low-rank training exists to avoid:
  adam, yogi and adagrad are refused there.

With ``none`` the aggregate is applied as it is, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from .factors import ModuleFactors, flatten_factors, unflatten_factors
from .lowrank import stack_factors, truncated_svd

__all__ = ["SERVER_OPTIMIZERS", "ServerOptimizer", "split_optimizer_tensors"]

SERVER_OPTIMIZERS: tuple[str, ...] = ("none", "avgm", "adam", "yogi", "adagrad")
ADAPTIVE = ("adam", "yogi", "adagrad")
#: server_lr when none is given: a momentum step of 1 is plain aggregation; adaptive steps are ~lr per element
DEFAULT_LR = {"none": 1.0, "avgm": 1.0, "adam": 1e-2, "yogi": 1e-2, "adagrad": 1e-2}


class ServerOptimizer:
    """One of :data:`SERVER_OPTIMIZERS` with its state; :meth:`step` rewrites a server update
    (``merge``, ``global_lora``)."""

    def __init__(self, name: str = "none", lr: float | None = None, momentum: float = 0.9,
                 betas: tuple[float, float] = (0.9, 0.99), tau: float = 1e-3, rank: int = 8):
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server_optimizer={name!r}: choose one of {SERVER_OPTIMIZERS}")
        self.name = name
        self.lr = DEFAULT_LR[name] if lr is None else float(lr)
        self.momentum, self.betas, self.tau = float(momentum), tuple(float(b) for b in betas), float(tau)
        self.rank = int(rank)
        if not self.lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"server_momentum and server_betas must lie in [0, 1), got {momentum}, {betas}")
        if not self.tau > 0:
            raise ValueError(f"server_tau must be > 0, got {tau}")
        if self.rank < 1:
            raise ValueError(f"the momentum rank must be >= 1, got {rank}")
        self._m: dict[str, torch.Tensor] = {}  # factors space: first moment, keys "<module>/B", "<module>/A"
        self._v: dict[str, torch.Tensor] = {}  # factors space, adaptive only: second moment
        self._M: ModuleFactors = {}  # product space: the factored momentum (B_M, A_M) per module

    def check_strategy(self, strategy) -> None:
        """Refuse a combination that has no factored form (see the module docstring)."""
        if self.name in ADAPTIVE and strategy.server_space == "product":
            raise ValueError(
                f"server_optimizer={self.name!r} cannot be used with strategy {strategy.name!r}: that strategy moves "
                "the model by a low-rank product, and an element-wise second moment of a product is a dense "
                "d_out x d_in matrix per layer. Use server_optimizer='avgm' (momentum kept in factored form) or a "
                "strategy that averages factors (fedit, ffa_lora)")

    def step(self, update, previous: ModuleFactors | None, space: str):
        """The update to apply instead of ``update``; ``previous`` is the global adapter before it."""
        if self.name == "none":
            return update
        if space == "factors":
            return self._factor_step(update, previous)
        if space == "product":
            return self._product_step(update, previous or {})
        raise ValueError(f"unknown server space {space!r} (expected 'factors' or 'product')")

    # -- factors: element-wise over B and A -------------------------------------------------
    def _factor_step(self, update, previous: ModuleFactors | None):
        if update.merge or update.global_lora is None or previous is None:
            raise ValueError("a 'factors' server step needs an update that only replaces the global adapter")
        new_global = {}
        for name, pair in update.global_lora.items():
            new_global[name] = tuple(self._element_step(f"{name}/{which}", x, agg)
                                     for which, x, agg in zip("BA", previous[name], pair))
        return replace(update, merge={}, global_lora=new_global)

    def _element_step(self, key: str, x: torch.Tensor, aggregate: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)  # moments of half-precision factors in fp32
        delta = (aggregate.to(work) - x.to(work))
        m = self._m.get(key)
        if self.name == "avgm":
            m = delta if m is None else self.momentum * m + delta
            self._m[key] = m
            return (x.to(work) + self.lr * m).to(x.dtype)
        b1, b2 = self.betas
        m = (1 - b1) * delta if m is None else b1 * m + (1 - b1) * delta
        v = self._v.get(key, torch.zeros_like(delta))
        sq = delta * delta
        if self.name == "adam":
            v = b2 * v + (1 - b2) * sq
        elif self.name == "yogi":
            v = v - (1 - b2) * sq * torch.sign(v - sq)
        else:  # adagrad
            v = v + sq
        self._m[key], self._v[key] = m, v
        return (x.to(work) + self.lr * m / (v.sqrt() + self.tau)).to(x.dtype)

    # -- product: factored momentum ------------------------------------------------------------
    def _product_step(self, update, previous: ModuleFactors):
        new_global = update.global_lora or {}
        merge = {}
        for name in update.merge.keys() | new_global.keys():
            parts = []  # (B, A, weight) of D_t = merge + global_new - global_prev
            if name in update.merge:
                parts.append((*update.merge[name], 1.0))
            if name in new_global:
                parts.append((*new_global[name], 1.0))
            if name in previous:
                parts.append((*previous[name], -1.0))
            if name in self._M:
                parts.append((*self._M[name], self.momentum))
            Bs, As, ws = zip(*parts)
            rank = min(self.rank, Bs[0].shape[0], As[0].shape[1])
            self._M[name] = truncated_svd(list(Bs), list(As), rank, list(ws))
            # merge' = lr M_t + global_prev - global_new: the model then moves by exactly lr M_t
            out = [(*self._M[name], self.lr)]
            if name in previous:
                out.append((*previous[name], 1.0))
            if name in new_global:
                out.append((*new_global[name], -1.0))
            Bo, Ao, wo = zip(*out)
            merge[name] = stack_factors(list(Bo), list(Ao), list(wo))
        return replace(update, merge=merge)

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``opt_m/<module>/B|A``, ``opt_v/...`` (factors space), ``opt_M/...`` (product space).

        Every tensor has the shape of the adapter factor it belongs to, so a checkpoint
        stores and checks them like strategy factors.
        """
        state = flatten_factors("opt_M", self._M)
        state.update({f"opt_m/{k}": t.contiguous() for k, t in self._m.items()})
        state.update({f"opt_v/{k}": t.contiguous() for k, t in self._v.items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._M = {n: (B.clone(), A.clone()) for n, (B, A) in unflatten_factors("opt_M", state).items()}
        self._m = {k[len("opt_m/"):]: t.clone() for k, t in state.items() if k.startswith("opt_m/")}
        self._v = {k[len("opt_v/"):]: t.clone() for k, t in state.items() if k.startswith("opt_v/")}

    def describe(self) -> dict:
        """Settings in force, for logs and model cards (empty when off)."""
        if self.name == "none":
            return {}
        out = {"server_optimizer": self.name, "server_lr": self.lr}
        if self.name == "avgm":
            out["server_momentum"] = self.momentum
        else:
            out.update(server_betas=list(self.betas), server_tau=self.tau)
        return out


def split_optimizer_tensors(strategy_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove and return the server optimizer's ``opt_*`` tensors, which checkpoints keep beside the strategy's."""
    return {k: strategy_tensors.pop(k) for k in list(strategy_tensors) if k.startswith("opt_")}
