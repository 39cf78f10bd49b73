"""Streaming gradient sketches (sketch.py) against dense references on small shapes."""

import math

import pytest
import torch

from fedsmooth_hf.math.gradient_aligned import gradient_aligned_factors
from fedsmooth_hf.math.sketch import DenseGradient, SketchedGradient, TestMatrices, sketch_sizes
from fedsmooth_hf.model.gradients import estimate_gradient_subspaces, estimate_weight_gradients

R = 4  # LoRA rank: the GA start wants q = 2r directions
Q = 2 * R


def _decaying_stream(d_out, d_in, n_batches=3, tokens=64, decay=0.8, seed=0):
    """Per-batch (x, g) whose summed g^T x has a known, geometrically decaying spectrum.

    Every token's x and g lie in fixed orthonormal bases with weights decaying like decay^i,
    plus a little isotropic noise: G = sum_b g_b^T x_b has singular values ~ decay^(2i).
    """
    gen = torch.Generator().manual_seed(seed)
    m = min(d_out, d_in)
    U, _ = torch.linalg.qr(torch.randn(d_out, m, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, m, generator=gen, dtype=torch.float64))
    w = decay ** torch.arange(m, dtype=torch.float64)
    batches = []
    for _ in range(n_batches):
        c = torch.randn(tokens, m, generator=gen, dtype=torch.float64)
        x = (c * w) @ V.T + 1e-3 * torch.randn(tokens, d_in, generator=gen, dtype=torch.float64)
        g = (c * w) @ U.T + 1e-3 * torch.randn(tokens, d_out, generator=gen, dtype=torch.float64)
        batches.append((x.float(), g.float()))
    return batches


def _stream_into(est, batches):
    for x, g in batches:
        est.add(x, g)
    return est


def _dense_of(batches):
    return sum(g.T.double() @ x.double() for x, g in batches).float()


def _functional(G, U, V, r):
    """Gradient energy a first LoRA step moves along: ||U_{r:2r}^T G||^2 + ||G V_{:r}||^2."""
    return float((U[:, r : 2 * r].T @ G).norm() ** 2 + (G @ V[:, :r]).norm() ** 2)


def _max_angle(A, B):
    cos = torch.linalg.svdvals(A.T.double() @ B.double()).min().clamp(max=1.0)
    return math.degrees(math.acos(float(cos)))


@pytest.mark.parametrize("shape", [(256, 192), (160, 320)])
def test_sketched_subspace_matches_exact_on_decaying_spectrum(shape):
    d_out, d_in = shape
    k, l = sketch_sizes(Q, d_out, d_in)
    batches = _decaying_stream(d_out, d_in)
    est = _stream_into(SketchedGradient(d_out, d_in, k, l, TestMatrices(0)), batches)
    G = _dense_of(batches)
    U, S, V = est.top_singular(Q)
    Ue, Se, Vhe = torch.linalg.svd(G.double(), full_matrices=False)
    Ue, Ve = Ue[:, :Q], Vhe[:Q].T
    # the leading directions are well separated here: the subspaces themselves must agree
    assert _max_angle(U, Ue) < 5.0 and _max_angle(V, Ve) < 5.0
    torch.testing.assert_close(S.double(), Se[:Q], rtol=1e-2, atol=0)
    # and the functional measure (the documented tolerance) holds
    assert _functional(G.double(), U.double(), V.double(), R) >= 0.95 * _functional(G.double(), Ue, Ve, R)


def test_sketch_accumulates_exactly_the_linear_images():
    """Y = G Omega and Z = Psi G, to float rounding, although G is never formed."""
    d_out, d_in = 96, 80
    tests = TestMatrices(3)
    batches = _decaying_stream(d_out, d_in, decay=0.95, seed=1)
    est = _stream_into(SketchedGradient(d_out, d_in, 12, 24, tests), batches)
    G = _dense_of(batches)
    torch.testing.assert_close(est.Y, G @ tests.omega(d_in, 12, "cpu"), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(est.Z, tests.psi(d_out, 24, "cpu") @ G, rtol=1e-4, atol=1e-4)


def test_deterministic_and_global_rng_untouched():
    d_out, d_in = 128, 96
    batches = _decaying_stream(d_out, d_in, seed=2)
    k, l = sketch_sizes(Q, d_out, d_in)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    U1, S1, V1 = _stream_into(SketchedGradient(d_out, d_in, k, l, TestMatrices(0)), batches).top_singular(Q)
    U2, S2, V2 = _stream_into(SketchedGradient(d_out, d_in, k, l, TestMatrices(0)), batches).top_singular(Q)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(U1, U2) and torch.equal(S1, S2) and torch.equal(V1, V2)
    # a different seed draws different test matrices (the seed is really used)
    other = TestMatrices(1).omega(d_in, k, "cpu")
    assert not torch.equal(other, TestMatrices(0).omega(d_in, k, "cpu"))


def test_test_matrices_are_shared_between_layers_of_one_dimension():
    tests = TestMatrices(0)
    a = SketchedGradient(64, 48, 8, 16, tests)
    b = SketchedGradient(64, 48, 8, 16, tests)
    c = SketchedGradient(32, 48, 8, 16, tests)
    assert a.omega is b.omega and a.psi is b.psi and a.omega is c.omega
    assert tests.nbytes == (48 * 8 + 16 * 64 + 16 * 32) * 4


def test_mean_of_rank_sketches_is_the_sketch_of_the_mean_gradient():
    """Two "ranks" with different data, the same test matrices: mean-reducing (Y, Z) is exact."""
    d_out, d_in = 128, 112
    k, l = sketch_sizes(Q, d_out, d_in)
    shard0 = _decaying_stream(d_out, d_in, seed=10)
    shard1 = _decaying_stream(d_out, d_in, seed=11)
    ranks = [_stream_into(SketchedGradient(d_out, d_in, k, l, TestMatrices(0)), s) for s in (shard0, shard1)]
    reduced = ranks[0]
    reduced.apply(lambda t: (t + ranks[1].Y if t is ranks[0].Y else t + ranks[1].Z) / 2)
    G_mean = (_dense_of(shard0) + _dense_of(shard1)) / 2
    tests = TestMatrices(0)
    torch.testing.assert_close(reduced.Y, G_mean @ tests.omega(d_in, k, "cpu"), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(reduced.Z, tests.psi(d_out, l, "cpu") @ G_mean, rtol=1e-4, atol=1e-3)


def test_sketch_sizes_fall_back_to_dense_on_small_layers():
    assert sketch_sizes(Q, 32, 32) is None  # sketches would not be smaller than G
    k, l = sketch_sizes(Q, 4096, 11008)
    assert Q < k < l and 4096 * k + l * 11008 < 0.05 * 4096 * 11008


# --------------------------------------------------------------------------- through the hooks
def _wide_mlp(d=160, hidden=192, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(24, d), torch.nn.Tanh(), torch.nn.Linear(d, hidden),
                               torch.nn.Tanh(), torch.nn.Linear(hidden, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _mlp_batches(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(32, 24, generator=gen), "y": torch.randint(0, 3, (32,), generator=gen)} for _ in range(n)]


def _mlp_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def test_gradient_pass_never_allocates_a_dense_buffer_for_sketched_layers():
    model = _wide_mlp()
    modules = {"0": model[0], "2": model[2], "4": model[4]}
    est = estimate_gradient_subspaces(model, modules, _mlp_batches(), rank=Q, loss_fn=_mlp_loss)
    assert est["2"].kind == "sketch" and est["4"].kind == "dense"  # 192x160 is sketched, 8x192 is not
    for name, e in est.items():
        d_out, d_in = e.shape
        if e.kind == "sketch":
            assert all(a * b < d_out * d_in for a, b in est.buffers[name]), est.buffers[name]
            assert (d_out, d_in) not in est.buffers[name]
    assert est.state_bytes < est.dense_bytes
    assert est.state_bytes == sum(e.nbytes for e in est.values())


def test_hooked_sketch_equals_sketch_of_hooked_dense_gradient():
    model = _wide_mlp(seed=1)
    modules = {"2": model[2]}
    batches = _mlp_batches(seed=4)
    before = torch.get_rng_state()
    est = estimate_gradient_subspaces(model, modules, batches, rank=Q, loss_fn=_mlp_loss)
    assert torch.equal(torch.get_rng_state(), before)
    G = estimate_weight_gradients(model, modules, batches, loss_fn=_mlp_loss)["2"]
    e = est["2"]
    torch.testing.assert_close(e.Y, G @ e.omega, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(e.Z, e.psi @ G, rtol=1e-4, atol=1e-6)


def test_dense_estimator_gives_exactly_the_dense_formula():
    """estimator='dense' (and tiny layers under 'sketch') reproduce the published GA factors."""
    model = _wide_mlp(seed=2)
    modules = {"0": model[0], "2": model[2]}
    batches = _mlp_batches(seed=5)
    G = estimate_weight_gradients(model, modules, batches, loss_fn=_mlp_loss)
    dense = estimate_gradient_subspaces(model, modules, batches, estimator="dense", loss_fn=_mlp_loss)
    for name in modules:
        assert isinstance(dense[name], DenseGradient)
        B, A = gradient_aligned_factors(dense[name], R, 64.0)
        B_ref, A_ref = gradient_aligned_factors(G[name], R, 64.0)
        torch.testing.assert_close(B @ A, B_ref @ A_ref)


def test_unknown_estimator_and_missing_rank_are_rejected():
    model = _wide_mlp()
    with pytest.raises(ValueError, match="estimator must be one of"):
        estimate_gradient_subspaces(model, {"2": model[2]}, _mlp_batches(1), rank=Q, estimator="svd",
                                    loss_fn=_mlp_loss)
    with pytest.raises(ValueError, match="needs the number of wanted directions"):
        estimate_gradient_subspaces(model, {"2": model[2]}, _mlp_batches(1), loss_fn=_mlp_loss)


# --------------------------------------------------------------------------- the option, through the strategy
def test_ga_estimator_option_is_validated_and_reaches_the_strategy():
    from fedsmooth_hf import FedSmoothLoRAConfig
    from fedsmooth_hf.strategies import get_strategy
    from fedsmooth_hf.strategies.registry import strategy_from_options

    with pytest.raises(ValueError, match="FedSmoothLoRAConfig.ga_estimator='svd'"):
        FedSmoothLoRAConfig(ga_estimator="svd")
    with pytest.raises(ValueError, match="ga_estimator='exact': must be one of"):
        get_strategy("fedsmoothlora", rank=2, ga_estimator="exact")
    strat = strategy_from_options("fedsmoothlora", {"rank": 3, "config": FedSmoothLoRAConfig(ga_estimator="dense")})
    from fedsmooth_hf import FederatedArguments
    assert strat.gradient_request() == {"rank": 6, "estimator": "dense"}
    assert strategy_from_options("fedsmoothlora", FederatedArguments().strategy_options()).gradient_request() == {
        "rank": 2 * FederatedArguments().lora_r, "estimator": "sketch"}


def test_client_start_from_sketches_matches_the_dense_start():
    """The strategy takes estimates: dense ones give exactly the tensor path, sketches the same energy."""
    from fedsmooth_hf.strategies import get_strategy

    shapes = {"a": (192, 256), "b": (256, 160)}
    streams = {n: _decaying_stream(*s, seed=20 + i) for i, (n, s) in enumerate(shapes.items())}
    dense = {n: _dense_of(st) for n, st in streams.items()}
    tests = TestMatrices(0)
    sketches = {n: _stream_into(SketchedGradient(*shapes[n], *sketch_sizes(Q, *shapes[n]), tests), st)
                for n, st in streams.items()}
    starts = {}
    for label, grads in [("tensor", dense), ("dense", {n: DenseGradient(g) for n, g in dense.items()}),
                         ("sketch", sketches)]:
        strat = get_strategy("fedsmoothlora", rank=R)
        strat.setup({n: (torch.zeros(s[0], R), torch.zeros(R, s[1])) for n, s in shapes.items()})
        starts[label] = strat.client_start(0, grads)
    for n, G in dense.items():
        B_t, A_t = starts["tensor"].offsets[n]
        B_d, A_d = starts["dense"].offsets[n]
        assert torch.equal(B_t, B_d) and torch.equal(A_t, A_d)
        # sketched GA factors: same scale, and >= 0.95 of the exact factors' gradient energy
        B_s, A_s = starts["sketch"].offsets[n]
        torch.testing.assert_close(B_s.norm(), B_t.norm(), rtol=1e-4, atol=0)
        kk = G.shape[0] ** 0.25 / 8.0
        U_s, V_s = -B_s / kk, A_s.T / kk  # offsets are (-B_ga, A_ga)
        U_t, V_t = -B_t / kk, A_t.T / kk
        energy = lambda U, V, G=G: float((U.T @ G).norm() ** 2 + (G @ V).norm() ** 2)  # noqa: E731
        assert energy(U_s, V_s) >= 0.95 * energy(U_t, V_t)
