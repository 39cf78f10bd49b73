"""Property tests of fedsmooth_hf.math.lowrank against a dense float64 ``torch.linalg.svd`` reference.

Shapes, per-pair ranks, weights (negative and zero included) and target ranks are
drawn by Hypothesis; the factored results must match what the dense matrix says.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsmooth_hf.math.lowrank import dense_top_svd, factored_norm, stack_factors, truncated_svd

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
FEW = settings(max_examples=20, deadline=None, derandomize=True)


@st.composite
def factored_sums(draw, dtype=torch.float64):
    """``(Bs, As, weights, rank)``: 1-4 pairs of a d_out x d_in delta, and a valid target rank."""
    d_out, d_in = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    ranks = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    weights = draw(st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0]) | st.floats(-4, 4, width=32),
                            min_size=len(ranks), max_size=len(ranks)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    Bs = [scale * torch.randn(d_out, r, generator=gen, dtype=dtype) for r in ranks]
    As = [torch.randn(r, d_in, generator=gen, dtype=dtype) for r in ranks]
    rank = draw(st.integers(1, min(d_out, d_in)))
    return Bs, As, weights, rank


def _dense(Bs, As, weights):
    return sum(w * B.double() @ A.double() for w, B, A in zip(weights, Bs, As))


@SETTINGS
@given(factored_sums())
def test_truncated_svd_is_the_best_rank_r_approximation(case):
    Bs, As, weights, rank = case
    D = _dense(Bs, As, weights)
    S = torch.linalg.svdvals(D)
    B, A = truncated_svd(Bs, As, rank, weights)
    d_out, d_in = D.shape
    assert B.shape == (d_out, rank) and A.shape == (rank, d_in) and B.dtype == A.dtype == torch.float64
    scale = float(S[0]) if S.numel() and S[0] > 0 else 1.0
    # Eckart-Young: the error equals the energy of the discarded singular values
    optimal = float(S[rank:].square().sum().sqrt())
    assert abs(float(torch.linalg.norm(D - B @ A)) - optimal) <= 1e-9 * scale
    # the kept singular values are the top-`rank` ones of the dense matrix
    kept = torch.linalg.svdvals(B @ A)[:rank]
    torch.testing.assert_close(kept, S[:rank], rtol=1e-8, atol=1e-10 * scale)
    # where the truncation is unique (a gap after S[rank-1]) it is the dense truncation itself
    if rank < S.numel() and S[rank - 1] - S[rank] > 1e-6 * scale:
        U, _, Vh = torch.linalg.svd(D, full_matrices=False)
        D_r = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        torch.testing.assert_close(B @ A, D_r, rtol=0, atol=1e-8 * scale)
    # the singular values are split evenly between the factors
    torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), rtol=1e-7, atol=1e-9 * scale**0.5)


@FEW
@given(factored_sums())
def test_rank_deficient_sums_are_padded_with_zeros(case):
    Bs, As, weights, _ = case
    D = _dense(Bs, As, weights)
    inner = sum(B.shape[1] for B in Bs)
    rank = min(D.shape)
    B, A = truncated_svd(Bs, As, rank, weights)
    torch.testing.assert_close(B @ A, D, rtol=0, atol=1e-9 * max(1.0, float(D.abs().max())))
    if inner < rank:
        assert torch.all(B[:, inner:] == 0) and torch.all(A[inner:] == 0)


@FEW
@given(factored_sums())
def test_stacking_and_norm_are_exact(case):
    Bs, As, weights, _ = case
    D = _dense(Bs, As, weights)
    B_cat, A_cat = stack_factors(Bs, As, weights)
    assert B_cat.shape[1] == sum(B.shape[1] for B in Bs)
    torch.testing.assert_close(B_cat @ A_cat, D, rtol=0, atol=1e-12 * max(1.0, float(D.abs().max())))
    norm = float(torch.linalg.norm(D))
    assert abs(factored_norm(Bs, As, weights) - norm) <= 1e-7 * max(norm, 1e-300) + 1e-12 * float(
        sum(abs(w) * torch.linalg.norm(B) * torch.linalg.norm(A) for w, B, A in zip(weights, Bs, As)))


@FEW
@given(factored_sums(dtype=torch.float32))
def test_float32_factors_stay_float32_and_near_optimal(case):
    Bs, As, weights, rank = case
    D = _dense(Bs, As, weights)
    S = torch.linalg.svdvals(D)
    B, A = truncated_svd(Bs, As, rank, weights)
    assert B.dtype == A.dtype == torch.float32
    magnitude = float(sum(abs(w) * torch.linalg.norm(b.double()) * torch.linalg.norm(a.double())
                          for w, b, a in zip(weights, Bs, As)))
    optimal = float(S[rank:].square().sum().sqrt())
    assert float(torch.linalg.norm(D - (B @ A).double())) <= optimal + 1e-4 * max(magnitude, 1e-30)


@FEW
@given(st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**31 - 1), st.data())
def test_dense_top_svd_matches_torch_svd(d_out, d_in, seed, data):
    k = data.draw(st.integers(1, min(d_out, d_in)))
    M = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    U, S, V = dense_top_svd(M, k)
    assert U.shape == (d_out, k) and S.shape == (k,) and V.shape == (d_in, k)
    torch.testing.assert_close(S, torch.linalg.svdvals(M)[:k], rtol=1e-10, atol=1e-12)
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(U.T @ U, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(V.T @ V, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(U.T @ M @ V, torch.diag(S), rtol=0, atol=1e-9)
