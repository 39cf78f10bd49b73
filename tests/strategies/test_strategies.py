"""Every strategy's aggregate against its defining formula; FedSmoothLoRA's rounds computed densely."""

import math

import pytest
import torch

from fedsmooth_hf.math.gradient_aligned import gradient_aligned_factors
from fedsmooth_hf.strategies import available_strategies, get_strategy, strategy_from_options, zeta_schedule

SHAPES = {"layer.a": (12, 20), "layer.b": (16, 10)}
R = 3


def _init_lora(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.zeros(o, R, dtype=torch.float64), torch.randn(R, i, generator=gen, dtype=torch.float64))
            for n, (o, i) in SHAPES.items()}


def _uploads(k=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {c: {n: (torch.randn(o, R, generator=gen, dtype=torch.float64),
                    torch.randn(R, i, generator=gen, dtype=torch.float64)) for n, (o, i) in SHAPES.items()}
            for c in range(k)}


WEIGHTS = {0: 10.0, 1: 30.0, 2: 60.0}
NORM = {0: 0.1, 1: 0.3, 2: 0.6}


def _dense(f):
    return f[0] @ f[1]


def _merge_dense(update, name):
    B, A = update.merge.get(name, (None, None))
    return 0 if B is None else B @ A


def _global_dense(update, name):
    return 0 if update.global_lora is None else _dense(update.global_lora[name])


def _best_rank_r(D, r):
    U, S, Vh = torch.linalg.svd(D)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def test_registry_lists_all_six_and_rejects_unknown():
    assert available_strategies() == sorted(["fedsmoothlora", "fedit", "ffa_lora", "fedex_lora", "flexlora", "frlora"])
    with pytest.raises(ValueError, match="valid strategies are: fedex_lora, fedit"):
        get_strategy("fedavg", rank=2)
    s = strategy_from_options("FedSmoothLoRA", {"rank": 2, "gamma": 16.0, "num_clients": 5})
    assert s.gamma == 16.0
    assert strategy_from_options("fedit", {"rank": 2, "gamma": 16.0}).rank == 2


@pytest.mark.parametrize("name", ["fedit", "ffa_lora", "fedex_lora", "flexlora", "frlora", "fedsmoothlora"])
def test_aggregate_matches_defining_formula(name):
    strat = get_strategy(name, rank=R)
    init = _init_lora()
    strat.setup(init)
    ups = _uploads()
    if name == "ffa_lora":  # clients share the frozen A
        ups = {c: {n: (B, init[n][1]) for n, (B, A) in up.items()} for c, up in ups.items()}
    update = strat.aggregate(ups, WEIGHTS)
    for n in SHAPES:
        mean_B = sum(NORM[c] * ups[c][n][0] for c in ups)
        mean_A = sum(NORM[c] * ups[c][n][1] for c in ups)
        mean_BA = sum(NORM[c] * _dense(ups[c][n]) for c in ups)
        merged, glob = _merge_dense(update, n), _global_dense(update, n)
        if name == "fedit":
            torch.testing.assert_close(glob, mean_B @ mean_A)
            assert not update.merge
        elif name == "ffa_lora":
            torch.testing.assert_close(glob, mean_B @ init[n][1])
            torch.testing.assert_close(glob, mean_BA)  # exact with a shared A
        elif name == "fedex_lora":
            torch.testing.assert_close(glob, mean_B @ mean_A)
            torch.testing.assert_close(merged, mean_BA - mean_B @ mean_A)
            torch.testing.assert_close(merged + glob, mean_BA)  # global model == average of client models
        elif name == "flexlora":
            torch.testing.assert_close(glob, _best_rank_r(mean_BA, R))
        elif name == "frlora":
            torch.testing.assert_close(merged, mean_BA - _dense(init[n]))
            torch.testing.assert_close(glob, _dense(init[n]))
        elif name == "fedsmoothlora":
            torch.testing.assert_close(merged, _best_rank_r(mean_BA, R))
            assert update.global_lora is None


@pytest.mark.parametrize("name", available_strategies())
def test_bad_aggregate_input(name):
    strat = get_strategy(name, rank=R)
    strat.setup(_init_lora())
    with pytest.raises(ValueError, match="empty"):
        strat.aggregate({}, {})
    ups = _uploads(2)
    with pytest.raises(ValueError, match="sum to > 0"):
        strat.aggregate(ups, {0: 0.0, 1: 0.0})
    with pytest.raises(ValueError, match="invalid weight"):
        strat.aggregate(ups, {0: -1.0, 1: 2.0})
    ups[1]["layer.b"][0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="client 1, module 'layer.b' contains NaN"):
        strat.aggregate(ups, {0: 1.0, 1: 1.0})
    bad = _uploads(1)
    bad[0]["layer.a"] = (torch.zeros(12, R + 1), torch.zeros(R + 1, 20))
    with pytest.raises(ValueError, match="shapes"):
        strat.aggregate(bad, {0: 1.0})


def test_zeta_schedules():
    assert zeta_schedule(3, 10, 0.8, "constant", 0.1) == 0.8
    assert zeta_schedule(0, 10, 1.0, "cosine", 0.2) == pytest.approx(1.0)
    assert zeta_schedule(5, 10, 1.0, "cosine", 0.2) == pytest.approx(0.6)
    assert zeta_schedule(10, 10, 1.0, "cosine", 0.2) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="zeta_mode"):
        get_strategy("fedsmoothlora", rank=2, zeta_mode="decay")


def test_fedsmoothlora_round_trip_dense_reference():
    """Two rounds of client start / upload / aggregate against the equations computed densely."""
    strat = get_strategy("fedsmoothlora", rank=R, num_rounds=4, gamma=16.0, zeta=0.9, zeta_mode="constant")
    strat.setup(_init_lora())
    gen = torch.Generator().manual_seed(7)
    grads = {n: torch.randn(*s, generator=gen, dtype=torch.float64) for n, s in SHAPES.items()}

    strat.begin_round(0)
    assert strat.gradient_point(0) is None
    start = strat.client_start(0, grads)
    trained = {}
    for n in SHAPES:
        B_ga, A_ga = gradient_aligned_factors(grads[n], R, 16.0)
        torch.testing.assert_close(_dense(start.lora[n]), B_ga @ A_ga)  # round 0: LoRA = GA
        torch.testing.assert_close(_dense(start.offsets[n]), -B_ga @ A_ga)
        B, A = start.lora[n]
        trained[n] = (B + 0.05 * torch.randn(B.shape, generator=gen, dtype=B.dtype),
                      A + 0.05 * torch.randn(A.shape, generator=gen, dtype=A.dtype))
    up0 = strat.client_upload(0, trained)
    for n in SHAPES:  # upload = SVD_r(B A - B_ga A_ga)
        expect = _best_rank_r(_dense(trained[n]) + _dense(start.offsets[n]), R)
        torch.testing.assert_close(_dense(up0[n]), expect.float(), rtol=1e-4, atol=1e-5)
    other = _uploads(1, seed=9)[0]
    strat._client_uploads[1] = {n: (B.float(), A.float()) for n, (B, A) in other.items()}
    upd = strat.aggregate({0: up0, 1: strat._client_uploads[1]}, {0: 1.0, 1: 3.0})
    server = {n: _dense(upd.merge[n]) for n in SHAPES}

    strat.begin_round(1)
    zeta = strat.current_zeta()
    assert zeta == 0.9
    point = strat.gradient_point(0)
    for n in SHAPES:
        torch.testing.assert_close(_dense(point[n]), zeta * (_dense(up0[n]) - server[n]))
    start1 = strat.client_start(0, grads)
    for n in SHAPES:
        B_ga, A_ga = gradient_aligned_factors(grads[n], R, 16.0)
        init = B_ga @ A_ga + zeta * (_dense(up0[n]).double() - server[n].double())
        torch.testing.assert_close(_dense(start1.lora[n]).double(), _best_rank_r(init, R), rtol=1e-4, atol=1e-5)
    # a client that never uploaded starts from the global model: no Round-Matching term
    assert strat.gradient_point(5) is None


def test_fedsmoothlora_state_round_trip_and_accounting():
    strat = get_strategy("fedsmoothlora", rank=R)
    strat.setup(_init_lora())
    for c, up in _uploads(3).items():
        strat._client_uploads[c] = up
    strat.aggregate(_uploads(3), WEIGHTS)
    per_client = sum(R * (o + i) for o, i in SHAPES.values()) * 8  # float64
    assert strat.client_state_bytes() == 3 * per_client
    clone = get_strategy("fedsmoothlora", rank=R)
    clone.setup(_init_lora())
    clone.load_state_dict(strat.state_dict())
    assert clone.client_state_bytes() == strat.client_state_bytes()
    for n in SHAPES:
        torch.testing.assert_close(_dense(clone._server[n]), _dense(strat._server[n]))
        torch.testing.assert_close(_dense(clone._client_uploads[2][n]), _dense(strat._client_uploads[2][n]))


def test_fedsmoothlora_requires_gradients():
    strat = get_strategy("fedsmoothlora", rank=R)
    strat.setup(_init_lora())
    with pytest.raises(ValueError, match="ga_samples"):
        strat.client_start(0, None)
    assert math.isclose(strat.gamma, 64.0)


def test_fedsmoothlora_without_gradient_aligned_init_is_round_matching_only():
    """ga_init=False (ablation): no gradient pass, PEFT's init in round 0, SVD_r(W_rm) afterwards, no offset."""
    strat = strategy_from_options("fedsmoothlora", {"rank": R, "num_rounds": 4, "zeta": 0.5, "zeta_mode": "constant",
                                                     "ga_init": False})
    assert strat.needs_gradient is False and get_strategy("fedsmoothlora", rank=R).needs_gradient is True
    strat.setup(_init_lora())
    strat.begin_round(0)
    start = strat.client_start(0, None)
    assert start.offsets == {}
    for n in SHAPES:
        torch.testing.assert_close(_dense(start.lora[n]), _dense(strat.init_lora[n]))
    trained = _uploads(1, seed=3)[0]
    up0 = strat.client_upload(0, trained)
    for n in SHAPES:  # nothing subtracted: the upload is the trained adapter itself
        torch.testing.assert_close(_dense(up0[n]), _dense(trained[n]).float(), rtol=1e-4, atol=1e-5)
    upd = strat.aggregate({0: up0, 1: _uploads(2, seed=4)[1]}, {0: 1.0, 1: 1.0})
    strat.begin_round(1)
    start1 = strat.client_start(0, None)
    assert start1.offsets == {}
    for n in SHAPES:
        w_rm = 0.5 * (_dense(up0[n]) - _dense(upd.merge[n]))
        torch.testing.assert_close(_dense(start1.lora[n]).double(), _best_rank_r(w_rm.double(), R),
                                   rtol=1e-4, atol=1e-5)


def test_options_are_the_strategys_own():
    """The method's config validates its options and names the field.

    ga_init=False estimates no gradient, so ga_samples=0 is fine; the deprecated FederatedArguments
    keywords reach the same check.
    """
    from fedsmooth_hf import FederatedArguments, FedSmoothLoRAConfig
    from fedsmooth_hf.persistence.hub import model_card

    assert FedSmoothLoRAConfig(ga_init=False, ga_samples=0).ga_samples == 0
    with pytest.raises(ValueError, match="FedSmoothLoRAConfig.ga_samples=0"):
        FedSmoothLoRAConfig(ga_samples=0)
    with pytest.raises(ValueError, match="FedSmoothLoRAConfig.gamma=0"):
        FedSmoothLoRAConfig(gamma=0)
    with pytest.warns(FutureWarning, match="FedSmoothLoRAConfig"), pytest.raises(ValueError, match="gamma=0"):
        FederatedArguments(gamma=0)
    strat = strategy_from_options("fedsmoothlora", {"rank": R, "zeta_mode": "auto", "ga_samples": 32,
                                                    "iid_data": False})
    with pytest.raises(ValueError, match=r"lora_r=3 is too large for layer 'a' \(5x8\): 2 \* lora_r must be <= 5"):
        strat.check_layer_shapes({"a": (5, 8)})
    get_strategy("fedit", rank=R).check_layer_shapes({"a": (5, 8)})  # r <= 5 is all FedIT needs
    fields = strat.card_fields()
    assert fields["zeta_mode"] == "cosine (zeta_mode=auto)" and fields["ga_samples"] == 32
    card = model_card("", {"strategy": "fedsmoothlora", "num_clients": 2}, fields, [])
    assert "| zeta_mode | cosine (zeta_mode=auto) |" in card and "| num_clients | 2 |" in card
    assert get_strategy("fedit", rank=R).card_fields() == {"strategy": "fedit"}
