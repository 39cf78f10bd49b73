"""Client-level DP mechanisms over factors: clip a client's contribution, release a noisy sum.

The unit of privacy is one client's whole contribution in a round (DP-FedAvg). A
contribution has one of two forms (docs/privacy.md):

* **linear** (FedIT, FFA-LoRA): named tensors, the factors a server averages. Its norm is
  the Euclidean norm of all of them together; the release is their clipped sum plus
  ``N(0, (z C)^2)`` on every entry.
* **product** (FedSmoothLoRA, FlexLoRA, FRLoRA, FedEx-LoRA's residual): per module a
  low-rank product ``Delta = B A``, of any inner rank. Its norm,
  ``sqrt(sum_modules ||B A||_F^2)``, comes from ``r x r`` Grams, never a dense matrix. The
  release is a two-pass linear sketch with shared randomness ``Omega`` (``d_in x k``,
  orthonormal columns)::

      pass 1:  Y = sum_c s_c B_c (A_c Omega) + N(0, (z C)^2)      Q = orth(Y)   (d_out x k)
      pass 2:  Z = sum_c s_c (Q^T B_c) A_c   + N(0, (z C)^2)      sum ~ Q Z

  ``s_c = min(1, C / ||Delta_c||)``. Since ``||Delta Omega|| <= ||Delta||`` and
  ``||Q^T Delta|| <= ||Delta||``, each pass has sensitivity ``C``: two Gaussian releases.
  With no noise and ``k >= rank(sum)`` it is exact; a smaller ``k`` is a randomized SVD.

Every draw comes from a ``torch.Generator`` the caller seeds, so a round's noise, and a
resumed run, is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .factors import ModuleFactors
from .lowrank import factored_norm

__all__ = ["linear_norm", "product_norm", "clip_scale", "gaussian_noise", "noisy_linear_sum", "sketch_test_matrix",
           "noisy_product_sum"]

Tensor = torch.Tensor


def linear_norm(contribution: Mapping[str, Tensor]) -> float:
    """Euclidean norm of all tensors of a linear contribution together."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in contribution.values()))


def product_norm(contribution: ModuleFactors) -> float:
    """``sqrt(sum_modules ||B A||_F^2)``, from the factors (``lowrank.factored_norm``)."""
    return math.sqrt(sum(factored_norm([B], [A]) ** 2 for B, A in contribution.values()))


def clip_scale(norm: float, clip: float) -> float:
    """The factor ``min(1, C / norm)`` that brings a contribution of ``norm`` within ``C``."""
    return 1.0 if norm <= clip else clip / norm


def gaussian_noise(shape, std: float, generator: torch.Generator) -> Tensor:
    """``N(0, std^2)`` of ``shape`` from ``generator``. A release split over several messages (secure
    aggregation under Flower) draws its noise here in the in-process order, so both runs add the same noise;
    ``std == 0`` draws nothing."""
    if std == 0.0:
        return torch.zeros(shape)
    return torch.randn(shape, generator=generator) * std


_noise = gaussian_noise


def noisy_linear_sum(contributions: Sequence[Mapping[str, Tensor]], scales: Sequence[float], std: float,
                     template: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """``sum_c s_c x_c + N(0, std^2)`` entry-wise; ``template`` gives the names and shapes (a round
    may have no contribution at all: then the release is the noise alone)."""
    out = {}
    for name, ref in template.items():
        total = torch.zeros(ref.shape, dtype=torch.float32)
        for x, s in zip(contributions, scales):
            total += s * x[name].float().cpu()
        out[name] = total + _noise(ref.shape, std, generator)
    return out


def sketch_test_matrix(d_in: int, width: int, generator: torch.Generator) -> Tensor:
    """``Omega``: a ``d_in x width`` matrix with orthonormal columns (QR of a Gaussian)."""
    width = min(width, d_in)
    Omega, _ = torch.linalg.qr(torch.randn(d_in, width, generator=generator, dtype=torch.float64))
    return Omega.float()


def noisy_product_sum(contributions: Sequence[ModuleFactors], scales: Sequence[float], std: float,
                      shapes: Mapping[str, tuple[int, int]], width: int, sketch_generator: torch.Generator,
                      noise_generator: torch.Generator) -> ModuleFactors:
    """The two-pass release of ``sum_c s_c B_c A_c`` per module, as factors ``(Q, Z)`` of inner rank ``k``.

    Args:
        contributions: per client, ``module -> (B, A)``.
        scales: per client, its clip factor ``s_c``.
        std: the noise standard deviation of each pass (``z * C``).
        shapes: ``module -> (d_out, d_in)`` (every module is released, with or without clients).
        width: sketch width ``k`` (at most ``min(d_out, d_in)`` per module).
        sketch_generator: the shared randomness ``Omega`` (every party can draw the same).
        noise_generator: the server's noise.
    """
    out = {}
    for name, (d_out, d_in) in shapes.items():
        k = min(width, d_out, d_in)
        Omega = sketch_test_matrix(d_in, k, sketch_generator)
        Y = torch.zeros(d_out, k)
        for contribution, s in zip(contributions, scales):
            B, A = (t.float().cpu() for t in contribution[name])
            Y += s * (B @ (A @ Omega))
        Y += _noise((d_out, k), std, noise_generator)
        Q, _ = torch.linalg.qr(Y)
        Z = torch.zeros(k, d_in)
        for contribution, s in zip(contributions, scales):
            B, A = (t.float().cpu() for t in contribution[name])
            Z += s * ((Q.T @ B) @ A)
        Z += _noise((k, d_in), std, noise_generator)
        out[name] = (Q, Z)
    return out
