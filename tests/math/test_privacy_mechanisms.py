"""Client-level DP mechanisms against dense references: factored norms, clipping, noise, the sketch."""

from __future__ import annotations

import math

import pytest
import torch

from fedsmooth_hf.math.privacy import (
    clip_scale,
    linear_norm,
    noisy_linear_sum,
    noisy_product_sum,
    product_norm,
    sketch_test_matrix,
)


def _factors(seed: int, shapes: dict, rank: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(d_out, rank, generator=g), torch.randn(rank, d_in, generator=g))
            for n, (d_out, d_in) in shapes.items()}


SHAPES = {"q": (12, 9), "v": (7, 10)}


def test_product_norm_is_the_dense_frobenius_norm_of_all_modules():
    f = _factors(0, SHAPES)
    dense = math.sqrt(sum(float((B @ A).double().pow(2).sum()) for B, A in f.values()))
    assert product_norm(f) == pytest.approx(dense, rel=1e-6)
    assert linear_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}) == pytest.approx(5.0)


@pytest.mark.parametrize("norm, clip, scaled", [(10.0, 2.0, 2.0), (1.0, 2.0, 1.0), (0.0, 2.0, 0.0)])
def test_clipping_brings_a_contribution_within_the_bound(norm, clip, scaled):
    assert norm * clip_scale(norm, clip) == pytest.approx(scaled)


def test_sketch_test_matrix_has_orthonormal_columns_so_it_never_grows_a_norm():
    Omega = sketch_test_matrix(10, 4, torch.Generator().manual_seed(1))
    assert torch.allclose(Omega.T @ Omega, torch.eye(4), atol=1e-5)
    f = _factors(2, {"v": (7, 10)})
    B, A = f["v"]
    assert torch.linalg.norm(B @ A @ Omega) <= torch.linalg.norm(B @ A) + 1e-5


def test_without_noise_a_wide_sketch_releases_the_exact_sum():
    clients = [_factors(s, SHAPES) for s in range(3)]
    scales = [1.0, 0.5, 0.25]
    out = noisy_product_sum(clients, scales, 0.0, SHAPES, width=9, sketch_generator=torch.Generator().manual_seed(3),
                            noise_generator=torch.Generator().manual_seed(4))
    for name in SHAPES:
        dense = sum(s * (c[name][0] @ c[name][1]) for c, s in zip(clients, scales))
        Q, Z = out[name]
        assert torch.allclose(Q @ Z, dense, atol=1e-4)


def test_sketch_passes_add_noise_of_the_given_std():
    shapes = {"w": (400, 300)}
    out = noisy_product_sum([], [], 0.7, shapes, width=40, sketch_generator=torch.Generator().manual_seed(5),
                            noise_generator=torch.Generator().manual_seed(6))
    Q, Z = out["w"]
    assert torch.allclose(Q.T @ Q, torch.eye(40), atol=1e-4)
    assert Z.std().item() == pytest.approx(0.7, rel=0.03)  # no client: pass 2 is the noise alone


def test_linear_release_is_the_clipped_sum_plus_noise_of_the_given_std():
    template = {"a": torch.zeros(200, 100)}
    clients = [{"a": torch.full((200, 100), 2.0)}, {"a": torch.full((200, 100), -1.0)}]
    exact = noisy_linear_sum(clients, [0.5, 1.0], 0.0, template, torch.Generator().manual_seed(0))
    assert torch.equal(exact["a"], torch.zeros(200, 100))
    noisy = noisy_linear_sum(clients, [0.5, 1.0], 1.5, template, torch.Generator().manual_seed(0))
    assert noisy["a"].mean().abs() < 0.05 and noisy["a"].std().item() == pytest.approx(1.5, rel=0.03)
