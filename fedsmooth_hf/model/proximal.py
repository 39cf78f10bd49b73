"""FedProx's proximal term: keep a client's local training near where its round started.

Non-IID clients drift towards their own optimum during many local steps; FedProx
(Li et al., 2020) adds ``mu / 2 * ||theta - theta_start||^2`` to the local loss, where
``theta`` are the parameters the client trains (its LoRA factors and ``modules_to_save``)
and ``theta_start`` their values when the round began. Its gradient ``mu (theta -
theta_start)`` pulls each step back towards the start. It works beside any strategy:
``theta_start`` is whatever start the strategy gave the client (for FedSmoothLoRA the
Gradient-Aligned, Round-Matched factors).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class ProximalTerm:
    """``mu / 2 * sum_p ||p - p_start||^2`` over the parameters of ``model`` that require grad.

    Built when a local round starts (it snapshots ``p_start``); computed in float32 so
    half-precision factors do not lose the small differences it measures.
    """

    def __init__(self, model: nn.Module, mu: float):
        if mu <= 0:
            raise ValueError(f"ProximalTerm: mu must be > 0, got {mu}")
        self.mu = float(mu)
        self.params = [(p, p.detach().float().clone()) for p in model.parameters() if p.requires_grad]

    def __call__(self) -> torch.Tensor:
        total = sum(((p.float() - start) ** 2).sum() for p, start in self.params)
        return 0.5 * self.mu * total


def check_proximal_supported(mu: float, zero3: bool) -> None:
    """FedProx needs whole parameters on every rank: refused under ZeRO-3, said before any training."""
    if mu > 0 and zero3:
        raise ValueError("FederatedArguments.prox_mu > 0 is not supported under ZeRO-3: the proximal term needs "
                         "whole parameters on every rank; use ZeRO-2 or no DeepSpeed")


@contextlib.contextmanager
def proximal_loss(trainer, term: ProximalTerm | None):
    """``trainer.proximal_term`` is ``term`` for the duration of a local round."""
    trainer.proximal_term = term
    try:
        yield
    finally:
        trainer.proximal_term = None


def with_proximal_term(trainer, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """``loss`` plus the live proximal term, entering each optimizer step once.

    Where Trainer divides micro-batch losses by the accumulation steps the term is added
    whole; where the loss is already normalized over the accumulated batch (the model
    takes ``num_items_in_batch``), it is added in equal shares.
    """
    scaled = trainer.loss_is_scaled_for_ga
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
            trainer.compute_loss_func is not None
    return loss + trainer.proximal_term() / (trainer.current_gradient_accumulation_steps if scaled else 1)
