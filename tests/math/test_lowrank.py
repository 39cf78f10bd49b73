"""Exact aggregation of LoRA products: factored SVDs against dense float64 ones, and clear errors."""

import pytest
import torch

from fedsmooth_hf.math.lowrank import dense_top_svd, factored_norm, stack_factors, truncated_svd


def _random_factors(gen, d_out, d_in, ranks):
    Bs = [torch.randn(d_out, r, generator=gen, dtype=torch.float64) for r in ranks]
    As = [torch.randn(r, d_in, generator=gen, dtype=torch.float64) for r in ranks]
    return Bs, As


@pytest.mark.parametrize(
    "d_out,d_in,ranks,weights,rank",
    [
        (40, 40, [3, 3, 3], [0.2, 0.5, 0.3], 4),  # square, average
        (80, 30, [4, 2], [1.0, -1.0], 5),  # tall, difference
        (25, 90, [5], None, 3),  # wide, single pair
        (30, 50, [6, 6, 6, 6, 6], [1.5, -0.7, 0.0, 2.0, -3.0], 10),  # many, negative and zero weights
        (12, 70, [8, 8], [0.5, 0.5], 12),  # total rank > min dim: QR clips the stack
    ],
)
def test_truncated_svd_matches_dense_svd(d_out, d_in, ranks, weights, rank):
    gen = torch.Generator().manual_seed(0)
    Bs, As = _random_factors(gen, d_out, d_in, ranks)
    ws = weights or [1.0] * len(Bs)
    D = sum(w * B @ A for w, B, A in zip(ws, Bs, As))
    U, S, Vh = torch.linalg.svd(D)
    D_r = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]

    B, A = truncated_svd(Bs, As, rank, weights)
    assert B.shape == (d_out, rank) and A.shape == (rank, d_in)
    assert B.dtype == torch.float64
    err = torch.linalg.norm(B @ A - D_r) / torch.linalg.norm(D_r)
    assert err <= 1e-5, err
    # singular values split evenly: column norms of B equal row norms of A
    torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), rtol=1e-8, atol=1e-10)


def test_truncated_svd_pads_when_sum_has_lower_rank():
    gen = torch.Generator().manual_seed(1)
    Bs, As = _random_factors(gen, 20, 30, [2])
    B, A = truncated_svd(Bs, As, 6)
    assert B.shape == (20, 6) and A.shape == (6, 30)
    torch.testing.assert_close(B @ A, Bs[0] @ As[0])
    assert torch.all(B[:, 2:] == 0) and torch.all(A[2:] == 0)


def test_difference_of_equal_products_is_zero():
    gen = torch.Generator().manual_seed(2)
    Bs, As = _random_factors(gen, 16, 24, [3])
    B, A = truncated_svd(Bs * 2, As * 2, 3, [1.0, -1.0])
    assert torch.linalg.norm(B @ A) < 1e-10


def test_float32_inputs_stay_float32_and_accurate():
    gen = torch.Generator().manual_seed(3)
    Bs = [torch.randn(64, 4, generator=gen) for _ in range(5)]
    As = [torch.randn(4, 48, generator=gen) for _ in range(5)]
    B, A = truncated_svd(Bs, As, 8, [0.2] * 5)
    D = sum(0.2 * b @ a for b, a in zip(Bs, As))
    U, S, Vh = torch.linalg.svd(D.double())
    best = S[8:].square().sum().sqrt()
    assert B.dtype == torch.float32
    assert torch.linalg.norm(D.double() - (B @ A).double()) <= best * (1 + 1e-4) + 1e-5


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda B, A: truncated_svd([B], [A], 11), "exceeds min"),
        (lambda B, A: truncated_svd([B], [A], 0), "positive integer"),
        (lambda B, A: truncated_svd([], [], 2), "empty"),
        (lambda B, A: truncated_svd([B, B], [A], 2), "2 B factors but 1 A"),
        (lambda B, A: truncated_svd([B], [A], 2, [1.0, 2.0]), "weights"),
        (lambda B, A: truncated_svd([B], [A], 2, [float("nan")]), "finite"),
        (lambda B, A: truncated_svd([B], [A[:2]], 2), "inner ranks"),
        (lambda B, A: truncated_svd([B, B[:5]], [A, A], 2), "expected"),
    ],
)
def test_bad_input_raises_clear_value_error(call, match):
    B, A = torch.randn(10, 3), torch.randn(3, 20)
    with pytest.raises(ValueError, match=match):
        call(B, A)


def test_nan_in_factor_is_rejected():
    B, A = torch.randn(10, 3), torch.randn(3, 20)
    B[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        truncated_svd([B], [A], 2)


def test_stack_and_norm_are_exact():
    gen = torch.Generator().manual_seed(4)
    Bs, As = _random_factors(gen, 15, 25, [2, 3, 4])
    ws = [0.5, -1.0, 2.0]
    Bc, Ac = stack_factors(Bs, As, ws)
    D = sum(w * B @ A for w, B, A in zip(ws, Bs, As))
    torch.testing.assert_close(Bc @ Ac, D)
    assert abs(factored_norm(Bs, As, ws) - float(torch.linalg.norm(D))) < 1e-9 * float(torch.linalg.norm(D))


@pytest.mark.parametrize("shape,exact_max_dim", [((50, 30), 2048), ((300, 200), 64)])
def test_dense_top_svd_exact_and_randomized(shape, exact_max_dim):
    gen = torch.Generator().manual_seed(5)
    # decaying spectrum, like a gradient
    U, _ = torch.linalg.qr(torch.randn(shape[0], shape[1], generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=gen, dtype=torch.float64))
    S = 0.5 ** torch.arange(shape[1], dtype=torch.float64)
    M = (U * S) @ V.T
    rng_before = torch.get_rng_state()
    Uk, Sk, Vk = dense_top_svd(M, 6, exact_max_dim=exact_max_dim)
    assert torch.equal(rng_before, torch.get_rng_state()), "must not advance the global RNG"
    torch.testing.assert_close(Sk, S[:6], rtol=1e-6, atol=1e-9)
    # subspaces agree (signs may differ)
    torch.testing.assert_close((Uk.T @ U[:, :6]).abs(), torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close((Vk.T @ V[:, :6]).abs(), torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
