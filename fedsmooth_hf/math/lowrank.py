"""Low-rank deltas held as factors.

Every quantity FedSmoothLoRA moves around (client uploads, the server aggregate,
the Round-Matching term, the Gradient-Aligned offset) is a weighted sum of
products ``B_i @ A_i``. Its best rank-``r`` approximation can be computed
exactly without ever forming the dense ``d_out x d_in`` matrix: stack the
factors, orthonormalise each side with a thin QR, and take the SVD of the small
``k x k`` core (``k`` = total rank). That costs ``O((d_in + d_out) k^2)`` instead
of the ``O(d_out d_in min(d_out, d_in))`` of a dense SVD.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["truncated_svd", "stack_factors", "factored_norm", "dense_top_svd", "truncate_factors", "pad_factors"]

Tensor = torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision factors are promoted: QR and SVD need at least fp32 to be exact."""
    return torch.promote_types(dtype, torch.float32)


def stack_factors(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float] | None = None
) -> tuple[Tensor, Tensor]:
    """Exact factored form of ``sum_i w_i B_i @ A_i`` as one pair ``(B_cat, A_cat)``.

    ``B_cat = [w_1 B_1, ..., w_K B_K]`` and ``A_cat = [A_1; ...; A_K]``, so
    ``B_cat @ A_cat`` equals the weighted sum with nothing truncated. Useful when a
    sum must be merged into a dense weight exactly (one ``addmm``).
    """
    if len(Bs) == 0:
        raise ValueError("stack_factors: got an empty list of factors; need at least one (B, A) pair")
    if len(Bs) != len(As):
        raise ValueError(f"stack_factors: {len(Bs)} B factors but {len(As)} A factors")
    if weights is None:
        weights = [1.0] * len(Bs)
    weights = [float(w) for w in weights]
    if len(weights) != len(Bs):
        raise ValueError(f"stack_factors: {len(weights)} weights for {len(Bs)} factor pairs")
    if not all(torch.isfinite(torch.tensor(weights, dtype=torch.float64))):
        raise ValueError(f"stack_factors: weights must be finite, got {weights}")

    d_out, d_in = Bs[0].shape[0], As[0].shape[-1]
    for i, (B, A) in enumerate(zip(Bs, As)):
        if B.dim() != 2 or A.dim() != 2:
            raise ValueError(
                f"factor pair {i}: B and A must be 2-D, got {tuple(B.shape)} and {tuple(A.shape)}"
            )
        if B.shape[1] != A.shape[0]:
            raise ValueError(
                f"factor pair {i}: inner ranks differ, B is {tuple(B.shape)} and A is {tuple(A.shape)}"
            )
        if B.shape[0] != d_out or A.shape[1] != d_in:
            raise ValueError(
                f"factor pair {i}: product is {B.shape[0]}x{A.shape[1]}, expected {d_out}x{d_in} like pair 0"
            )
        if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
            raise ValueError(f"factor pair {i} contains NaN or Inf")

    B_cat = torch.cat([w * B for w, B in zip(weights, Bs)], dim=1)
    A_cat = torch.cat(list(As), dim=0)
    return B_cat, A_cat


def truncated_svd(
    Bs: Sequence[Tensor],
    As: Sequence[Tensor],
    rank: int,
    weights: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` approximation of ``sum_i w_i B_i @ A_i``, in factored form.

    Args:
        Bs: factors ``B_i`` of shape ``(d_out, r_i)``.
        As: factors ``A_i`` of shape ``(r_i, d_in)``.
        rank: target rank; must satisfy ``1 <= rank <= min(d_out, d_in)``.
        weights: optional per-pair weights (any finite reals: ``[1, -1]`` is a difference).

    Returns:
        ``(B, A)`` with ``B`` of shape ``(d_out, rank)`` and ``A`` of shape ``(rank, d_in)``,
        in the dtype of ``Bs[0]``. The singular values are split as ``sqrt(S)`` on each
        side so both factors have similar norms. When the sum has rank below ``rank``
        the trailing columns/rows are zero, so shapes never depend on the data.

    The result is exact up to floating point (Eckart-Young on the stacked factors),
    never forms a ``d_out x d_in`` matrix, and costs ``O((d_out + d_in) k^2)`` for
    total inner rank ``k = sum_i r_i``.
    """
    B_cat, A_cat = stack_factors(Bs, As, weights)
    d_out, d_in = B_cat.shape[0], A_cat.shape[1]
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"truncated_svd: rank must be a positive integer, got {rank!r}")
    if rank > min(d_out, d_in):
        raise ValueError(
            f"truncated_svd: rank {rank} exceeds min(d_out, d_in) = {min(d_out, d_in)} of a {d_out}x{d_in} delta"
        )

    out_dtype = B_cat.dtype
    work = _compute_dtype(out_dtype)
    B_cat = B_cat.to(work)
    A_cat = A_cat.to(work)

    # B_cat = Qb Rb, A_cat^T = Qa Ra  =>  B_cat A_cat = Qb (Rb Ra^T) Qa^T.
    Qb, Rb = torch.linalg.qr(B_cat, mode="reduced")
    Qa, Ra = torch.linalg.qr(A_cat.T, mode="reduced")
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)

    keep = min(rank, S.shape[0])
    root = S[:keep].sqrt()
    B = torch.zeros(d_out, rank, dtype=work, device=B_cat.device)
    A = torch.zeros(rank, d_in, dtype=work, device=B_cat.device)
    B[:, :keep] = (Qb @ U[:, :keep]) * root
    A[:keep] = root[:, None] * (Vh[:keep] @ Qa.T)
    return B.to(out_dtype), A.to(out_dtype)


def factored_norm(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float] | None = None
) -> float:
    """Frobenius norm of ``sum_i w_i B_i @ A_i`` from the factors: ``sqrt(tr((B^T B)(A A^T)))``."""
    B_cat, A_cat = stack_factors(Bs, As, weights)
    work = _compute_dtype(B_cat.dtype)
    B_cat, A_cat = B_cat.to(work), A_cat.to(work)
    sq = torch.sum((B_cat.T @ B_cat) * (A_cat @ A_cat.T))
    return float(sq.clamp_min(0).sqrt())


def dense_top_svd(matrix: Tensor, k: int, exact_max_dim: int = 2048, oversample: int = 16, niter: int = 4):
    """Top-``k`` singular triplets ``(U_k, S_k, V_k)`` of a dense matrix (a gradient).

    A gradient has no factored form, so this is the one place a dense SVD is needed.
    Layers with ``min(shape) <= exact_max_dim`` use the exact ``torch.linalg.svd``;
    larger ones a randomized SVD (``torch.svd_lowrank``) with ``oversample`` extra
    directions and ``niter`` power iterations, which is accurate for the leading
    ``k`` directions of a gradient whose spectrum decays.
    """
    if matrix.dim() != 2:
        raise ValueError(f"dense_top_svd expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    if not 1 <= k <= min(matrix.shape):
        raise ValueError(
            f"dense_top_svd: k={k} must be in [1, {min(matrix.shape)}] for shape {tuple(matrix.shape)}"
        )
    m = matrix.to(_compute_dtype(matrix.dtype))
    if min(m.shape) <= exact_max_dim:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k].T
    q = min(k + oversample, min(m.shape))
    # The random test matrix is drawn from a private, fixed-seed stream so results are
    # reproducible and the caller's global RNG (dropout, data order) is not advanced.
    devices = [m.device] if m.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        U, S, V = torch.svd_lowrank(m, q=q, niter=niter)
    return U[:, :k], S[:k], V[:, :k]


def truncate_factors(factors: Mapping[str, tuple[Tensor, Tensor]], rank: int) -> dict[str, tuple[Tensor, Tensor]]:
    """The leading ``rank`` components of every module: ``B[:, :rank]``, ``A[:rank]``."""
    return {n: (B[:, :rank].clone(), A[:rank].clone()) for n, (B, A) in factors.items()}


def pad_factors(factors: Mapping[str, tuple[Tensor, Tensor]], rank: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Zero-pad factors of a smaller inner rank to ``rank`` (``B A`` is unchanged)."""
    out = {}
    for n, (B, A) in factors.items():
        k = B.shape[1]
        if k == rank:
            out[n] = (B, A)
            continue
        out[n] = (torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1),
                  torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0))
    return out
