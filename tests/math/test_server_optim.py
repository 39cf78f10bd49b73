"""Server optimizers against their update written out by hand on dense float64 tensors."""

from __future__ import annotations

import pytest
import torch

from fedsmooth_hf.math.server_optim import SERVER_OPTIMIZERS, ServerOptimizer
from fedsmooth_hf.strategies import get_strategy
from fedsmooth_hf.strategies.base import ServerUpdate

D_OUT, D_IN, R = 7, 5, 2


def _pair(gen):
    return (torch.randn(D_OUT, R, generator=gen, dtype=torch.float64),
            torch.randn(R, D_IN, generator=gen, dtype=torch.float64))


def _reference_factor_step(name, x, agg, state, lr, momentum=0.9, b1=0.9, b2=0.99, tau=1e-3):
    """FedOpt's update of one tensor, written out."""
    d = agg - x
    if name == "avgm":
        state["m"] = d if "m" not in state else momentum * state["m"] + d
        return x + lr * state["m"]
    state["m"] = (1 - b1) * d + (b1 * state["m"] if "m" in state else 0)
    v = state.get("v", torch.zeros_like(d))
    if name == "adam":
        v = b2 * v + (1 - b2) * d**2
    elif name == "yogi":
        v = v - (1 - b2) * d**2 * torch.sign(v - d**2)
    else:
        v = v + d**2
    state["v"] = v
    return x + lr * state["m"] / (v.sqrt() + tau)


@pytest.mark.parametrize("name", ["avgm", "adam", "yogi", "adagrad"])
def test_factor_space_first_two_rounds_equal_the_written_out_update(name):
    gen = torch.Generator().manual_seed(0)
    opt = ServerOptimizer(name, lr=0.3)
    current = {"q": _pair(gen), "v": _pair(gen)}
    reference = {key: {} for key in ("q/B", "q/A", "v/B", "v/A")}
    expected = {n: pair for n, pair in current.items()}
    for _ in range(2):
        aggregate = {n: _pair(gen) for n in current}
        out = opt.step(ServerUpdate(merge={}, global_lora=aggregate), current, "factors")
        expected = {n: tuple(_reference_factor_step(name, x, a, reference[f"{n}/{w}"], 0.3)
                             for w, x, a in zip("BA", expected[n], aggregate[n])) for n in current}
        for n in current:
            torch.testing.assert_close(out.global_lora[n][0], expected[n][0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(out.global_lora[n][1], expected[n][1], rtol=1e-12, atol=1e-12)
        assert out.merge == {}
        current = out.global_lora


def test_avgm_without_momentum_and_unit_lr_is_plain_aggregation():
    gen = torch.Generator().manual_seed(1)
    current, aggregate = {"q": _pair(gen)}, {"q": _pair(gen)}
    out = ServerOptimizer("avgm", lr=1.0, momentum=0.0).step(ServerUpdate({}, aggregate), current, "factors")
    torch.testing.assert_close(out.global_lora["q"][0], aggregate["q"][0])
    torch.testing.assert_close(out.global_lora["q"][1], aggregate["q"][1])


def test_none_returns_the_update_itself():
    update = ServerUpdate(merge={}, global_lora={})
    assert ServerOptimizer("none").step(update, {}, "factors") is update


def _dense(factors):
    B, A = factors
    return B @ A


def _best_rank(matrix, k):
    U, S, Vh = torch.linalg.svd(matrix)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


@pytest.mark.parametrize("with_global", [False, True])  # FedSmoothLoRA-like (merge only) / FlexLoRA-like
@pytest.mark.parametrize("rank", [2 * R, 3])  # exact, and truncated below D_t's rank
def test_product_space_momentum_is_the_truncated_dense_momentum(with_global, rank):
    gen = torch.Generator().manual_seed(2)
    opt = ServerOptimizer("avgm", lr=0.5, momentum=0.8, rank=rank)
    previous = {"q": _pair(gen)} if with_global else None
    M = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    for _ in range(3):
        merge = {"q": _pair(gen)} if not with_global else {}
        new_global = {"q": _pair(gen)} if with_global else None
        D = (_dense(merge["q"]) if merge else 0) + (
            _dense(new_global["q"]) - _dense(previous["q"]) if with_global else 0)
        M = _best_rank(0.8 * M + D, rank)
        out = opt.step(ServerUpdate(merge=merge, global_lora=new_global), previous, "product")
        moved = _dense(out.merge["q"]) + (_dense(out.global_lora["q"]) - _dense(previous["q"]) if with_global else 0)
        torch.testing.assert_close(moved, 0.5 * M, rtol=1e-9, atol=1e-9)
        assert out.global_lora is new_global
        previous = new_global


def test_resume_from_state_dict_is_bit_identical():
    gen = torch.Generator().manual_seed(3)
    for space, name in (("factors", "adam"), ("product", "avgm")):
        a = ServerOptimizer(name, lr=0.1, rank=3)
        current = {"q": _pair(gen)}
        rounds = [{"q": _pair(gen)} for _ in range(3)]

        def update(agg, space=space):
            factors = space == "factors"
            return ServerUpdate(merge={} if factors else agg, global_lora=agg if factors else None)

        a.step(update(rounds[0]), current, space)
        b = ServerOptimizer(name, lr=0.1, rank=3)
        b.load_state_dict({k: t.clone() for k, t in a.state_dict().items()})
        assert a.state_dict().keys() == b.state_dict().keys() and a.state_dict()
        for agg in rounds[1:]:
            ua, ub = a.step(update(agg), current, space), b.step(update(agg), current, space)
            pairs = (ua.global_lora, ub.global_lora) if space == "factors" else (ua.merge, ub.merge)
            assert all(torch.equal(x, y) for n in pairs[0] for x, y in zip(pairs[0][n], pairs[1][n]))


@pytest.mark.parametrize("name", ["adam", "yogi", "adagrad"])
@pytest.mark.parametrize("strategy", ["fedsmoothlora", "flexlora", "frlora", "fedex_lora"])
def test_adaptive_optimizers_are_refused_where_the_state_would_be_dense(name, strategy):
    with pytest.raises(ValueError, match="dense"):
        ServerOptimizer(name).check_strategy(get_strategy(strategy, rank=R))
    ServerOptimizer("avgm").check_strategy(get_strategy(strategy, rank=R))  # the factored one is fine
    ServerOptimizer(name).check_strategy(get_strategy("fedit", rank=R))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="server_optimizer='sgd'"):
        ServerOptimizer("sgd")
    with pytest.raises(ValueError, match="server_lr"):
        ServerOptimizer("adam", lr=0)
    with pytest.raises(ValueError, match="server_momentum"):
        ServerOptimizer("avgm", momentum=1.0)
    assert set(SERVER_OPTIMIZERS) == {"none", "avgm", "adam", "yogi", "adagrad"}
