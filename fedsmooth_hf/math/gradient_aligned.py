"""Gradient-Aligned client starts (LoRA-GA "ArB2r", stable scale) and their Round-Matching variant.

Pure factor math next to :mod:`fedsmooth_hf.math.lowrank`: a layer's gradient (or an
estimate of it) in, LoRA factors out. Where the factors go (a PEFT adapter, a frozen
offset) is :mod:`fedsmooth_hf.model.adapter`'s business; which client starts where is the
strategy's (``strategies/fedsmoothlora.py``).
"""

from __future__ import annotations

import math

import torch

from .factors import Factors
from .lowrank import truncated_svd
from .sketch import DenseGradient

__all__ = ["gradient_aligned_factors", "client_init_factors"]



def gradient_aligned_factors(grad, rank: int, gamma: float) -> Factors:
    """LoRA-GA factors with the paper's stable scale (no singular values used).

    With ``G = U S V^T``: ``A = k V[:, :r]^T``, ``B = k U[:, r:2r]``,
    ``k = d_out^(1/4) / sqrt(gamma)``. ``B @ A`` is then a rank-``r`` matrix whose
    first LoRA step moves the weight along the top-``2r`` gradient directions.
    (PEFT's ``init_lora_weights="lora_ga"`` scales B by ``S[r:2r]`` instead; that is
    a different matrix and is not used here.)

    ``grad`` is the dense ``G`` (a tensor: its exact top singular vectors are used) or
    any estimate of it with ``.shape`` and ``.top_singular(q) -> (U, S, V)``
    (``sketch.DenseGradient``, ``sketch.SketchedGradient``).
    """
    if isinstance(grad, torch.Tensor):
        if grad.dim() != 2:
            raise ValueError(f"gradient_aligned_factors: grad must be 2-D, got shape {tuple(grad.shape)}")
        if not torch.isfinite(grad).all():
            raise ValueError("gradient_aligned_factors: the gradient contains NaN or Inf")
        grad = DenseGradient(grad)
    if gamma <= 0:
        raise ValueError(f"gradient_aligned_factors: gamma must be > 0, got {gamma}")
    d_out, d_in = grad.shape
    if 2 * rank > min(d_out, d_in):
        raise ValueError(
            f"lora_r={rank} is too large for a {d_out}x{d_in} layer: the Gradient-Aligned init needs "
            f"2 * lora_r <= min(d_out, d_in) = {min(d_out, d_in)}"
        )
    U, _, V = grad.top_singular(2 * rank)
    k = d_out**0.25 / math.sqrt(gamma)
    A = k * V[:, :rank].T.contiguous()
    B = k * U[:, rank : 2 * rank].contiguous()
    return B, A


def client_init_factors(
    grad, rank: int, gamma: float, round_matching: Factors | None = None
) -> tuple[Factors, Factors]:
    """FedSmoothLoRA client start for one layer: ``(lora (B, A), gradient-aligned (B_ga, A_ga))``.

    ``grad`` is ``G`` or an estimate of it (see :func:`gradient_aligned_factors`).
    ``round_matching`` is ``W_rm`` in factored form (any inner rank, e.g. ``2r``), or
    ``None`` in round 0. The LoRA factors are ``SVD_r(B_ga A_ga + W_rm)``, exact in
    factored form; the caller offsets the frozen weight by ``- s * B_ga A_ga``.
    """
    B_ga, A_ga = gradient_aligned_factors(grad, rank, gamma)
    if round_matching is None:
        return (B_ga.clone(), A_ga.clone()), (B_ga, A_ga)
    B_rm, A_rm = (t.to(device=B_ga.device, dtype=B_ga.dtype) for t in round_matching)
    lora = truncated_svd([B_ga, B_rm], [A_ga, A_rm], rank)
    return lora, (B_ga, A_ga)
