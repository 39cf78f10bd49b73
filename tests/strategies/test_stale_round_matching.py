"""Partial participation: Round-Matching of a client that skipped rounds, and zeta_mode=auto.

Each stale-client policy is checked against its defining formula computed densely on
hand-made uploads; under full participation every policy must give the same numbers.
"""

import pytest
import torch

from fedsmooth_hf import FedSmoothLoRAConfig
from fedsmooth_hf.strategies import get_strategy
from fedsmooth_hf.strategies.fedsmoothlora import STALE_ROUND_MATCHING, resolve_zeta_mode

SHAPES = {"layer.a": (12, 20), "layer.b": (16, 10)}
R = 3
ZETA = 0.7


def _factors(gen):
    return {n: (torch.randn(o, R, generator=gen, dtype=torch.float64),
                torch.randn(R, i, generator=gen, dtype=torch.float64)) for n, (o, i) in SHAPES.items()}


def _dense(f):
    return f[0] @ f[1]


def _best_rank(D, r):
    U, S, Vh = torch.linalg.svd(D)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def _run(policy, schedule, rounds, seed=0):
    """Play ``rounds`` rounds; ``schedule[t]`` = clients uploading in round t.

    Returns (strategy, uploads, aggregates).
    """
    strat = get_strategy("fedsmoothlora", rank=R, num_rounds=10, zeta=ZETA, zeta_mode="constant",
                         stale_round_matching=policy, ga_init=False)
    gen = torch.Generator().manual_seed(seed)
    strat.setup(_factors(gen))
    uploads, aggregates = {}, []
    for t in range(rounds):
        strat.begin_round(t)
        ups = {}
        for c in schedule[t]:
            strat.client_start(c, None)
            ups[c] = strat.client_upload(c, _factors(gen))
            uploads[c] = (t, ups[c])
        update = strat.aggregate(ups, {c: 1.0 + c for c in ups})
        strat.receive_update(update)
        aggregates.append(update.merge)
    strat.begin_round(rounds)
    return strat, uploads, aggregates


@pytest.mark.parametrize("policy", STALE_ROUND_MATCHING)
def test_stale_client_follows_its_policy_formula(policy):
    # client 0 uploads in round 0 and then misses rounds 1 and 2; client 1 takes part every round
    strat, uploads, aggregates = _run(policy, [[0, 1], [1], [1]], rounds=3)
    t0, own = uploads[0]
    assert t0 == 0
    rm = strat.round_matching(0)
    for n in SHAPES:
        if policy == "reset":
            assert rm is None
            continue
        got = _dense(rm[n]).double()
        if policy == "paper":  # zeta (B_c A_c - B_s A_s) with the latest aggregate
            expect = ZETA * (_dense(own[n]).double() - _dense(aggregates[-1][n]).double())
        else:  # continuity: its own old end state, W_rm = zeta (B_c A_c - sum of the aggregates since), rank 2r
            exact = ZETA * (_dense(own[n]).double() - sum(_dense(a[n]).double() for a in aggregates[t0:]))
            expect = _best_rank(exact, 2 * R)
            assert rm[n][0].shape[1] == rm[n][1].shape[0] == 2 * R  # bounded rank
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    # a client that took part in the previous round is matched by the published formula under every policy
    rm1 = strat.round_matching(1)
    for n in SHAPES:
        expect = ZETA * (_dense(uploads[1][1][n]) - _dense(aggregates[-1][n]))
        torch.testing.assert_close(_dense(rm1[n]).double(), expect.double(), rtol=1e-4, atol=1e-5)


def test_continuity_resumes_the_clients_own_end_state():
    """Continuity puts the stale client where it ended: W_t + s W_rm = W_{t0} + s B_c A_c (zeta = 1)."""
    strat, uploads, aggregates = _run("continuity", [[0, 1, 2], [1], [2], [1, 2]], rounds=4)
    strat.zeta = 1.0
    t0, own = uploads[0]
    rm = strat.round_matching(0)
    for n in SHAPES:
        # W_t - W_{t0} = sum of aggregates merged since round t0; rank(B_c A_c - that sum) <= 4r here, so truncate
        end_state_offset = _dense(own[n]).double() - sum(_dense(a[n]).double() for a in aggregates[t0:])
        torch.testing.assert_close(_dense(rm[n]).double(), _best_rank(end_state_offset.double(), 2 * R),
                                   rtol=1e-4, atol=1e-5)
    # only the aggregates since the stalest upload are kept
    assert sorted(strat._merged) == [0, 1, 2, 3]
    strat.begin_round(4)
    strat.client_start(0, None)
    strat.client_upload(0, _factors(torch.Generator().manual_seed(5)))
    strat.receive_update(strat.aggregate({0: strat._client_uploads[0]}, {0: 1.0}))
    assert min(strat._merged) == min(strat._upload_round.values()) == 3


def test_full_participation_is_the_same_under_every_policy():
    """Every client every round: bit-identical starts, uploads and aggregates whatever the policy."""
    results = {}
    for policy in STALE_ROUND_MATCHING:
        strat, uploads, aggregates = _run(policy, [[0, 1, 2]] * 3, rounds=3)
        results[policy] = ([strat.round_matching(c) for c in range(3)], aggregates)
    ref_rm, ref_agg = results["paper"]
    for policy, (rms, aggs) in results.items():
        for a, b in zip(rms, ref_rm):
            for n in SHAPES:
                assert torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]), policy
        for a, b in zip(aggs, ref_agg):
            for n in SHAPES:
                assert torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]), policy


@pytest.mark.parametrize("policy", STALE_ROUND_MATCHING)
def test_state_dict_round_trip_keeps_upload_rounds_and_history(policy):
    strat, _, _ = _run(policy, [[0, 1], [1], [1]], rounds=3)
    clone = get_strategy("fedsmoothlora", rank=R, num_rounds=10, zeta=ZETA, zeta_mode="constant",
                         stale_round_matching=policy, ga_init=False)
    clone.setup(strat.init_lora)
    clone.load_state_dict(strat.state_dict())
    clone.begin_round(strat.round)
    assert clone._upload_round == strat._upload_round
    for c in (0, 1):
        a, b = strat.round_matching(c), clone.round_matching(c)
        assert (a is None) == (b is None)
        for n in SHAPES if a is not None else ():
            assert torch.equal(_dense(a[n]), _dense(b[n]))


def test_zeta_mode_auto_resolves_by_split():
    assert resolve_zeta_mode("auto", True) == "constant"
    assert resolve_zeta_mode("auto", False) == "cosine"
    assert resolve_zeta_mode("auto", None) == "cosine"  # user-given clients: heterogeneity unknown
    assert resolve_zeta_mode("constant", False) == "constant"
    strat = get_strategy("fedsmoothlora", rank=2, iid_data=False)
    assert strat.zeta_mode == "cosine" and strat.describe()["zeta_mode_requested"] == "auto"
    with pytest.raises(ValueError, match="FedSmoothLoRAConfig.zeta_mode='linear'"):
        FedSmoothLoRAConfig(zeta_mode="linear")
    with pytest.raises(ValueError, match="FedSmoothLoRAConfig.stale_round_matching='skip'"):
        FedSmoothLoRAConfig(stale_round_matching="skip")
    with pytest.raises(ValueError, match="stale_round_matching"):
        get_strategy("fedsmoothlora", rank=2, stale_round_matching="skip")


def test_round_metrics_report_the_share_of_round_matching_kept():
    """rm_kept = 1 - ||SVD_r(B_ga A_ga + W_rm) - B_ga A_ga - W_rm|| / ||W_rm||, checked densely."""
    from fedsmooth_hf.math.gradient_aligned import gradient_aligned_factors

    strat = get_strategy("fedsmoothlora", rank=R, num_rounds=4, gamma=16.0, zeta=1.0, zeta_mode="constant")
    gen = torch.Generator().manual_seed(3)
    strat.setup(_factors(gen))
    grads = {n: torch.randn(*s, generator=gen, dtype=torch.float64) for n, s in SHAPES.items()}
    strat.begin_round(0)
    for c in (0, 1):
        strat.client_start(c, grads)
        strat.client_upload(c, _factors(gen))
    assert "rm_kept_median" not in strat.round_metrics()  # nothing to match in round 0
    strat.receive_update(strat.aggregate(dict(strat._client_uploads), {0: 1.0, 1: 1.0}))
    strat.begin_round(1)
    rm = strat.round_matching(0)
    strat.client_start(0, grads)
    kept = []
    for n in SHAPES:
        B_ga, A_ga = gradient_aligned_factors(grads[n], R, 16.0)
        W_rm = _dense(rm[n]).double()
        start = _best_rank(B_ga @ A_ga + W_rm, R) - B_ga @ A_ga
        kept.append(1 - torch.linalg.norm(start - W_rm) / torch.linalg.norm(W_rm))
    metrics = strat.round_metrics()
    assert metrics["zeta"] == 1.0
    assert metrics["rm_kept_median"] == pytest.approx(float(torch.stack(kept).median()), abs=1e-5)
    assert 0.0 < metrics["rm_kept_median"] < 1.0  # rank-2r W_rm cannot survive a rank-r init whole


def test_exact_round_matching_starts_exactly_at_w_rm_and_uploads_the_change():
    """Variant: LoRA = GA factors, offset = -B_ga A_ga + W_rm; upload = SVD_r(B A - B_ga A_ga + W_rm)."""
    from fedsmooth_hf.math.gradient_aligned import gradient_aligned_factors

    strat = get_strategy("fedsmoothlora", rank=R, num_rounds=4, gamma=16.0, zeta=0.8, zeta_mode="constant",
                         exact_round_matching=True)
    gen = torch.Generator().manual_seed(4)
    strat.setup(_factors(gen))
    grads = {n: torch.randn(*s, generator=gen, dtype=torch.float64) for n, s in SHAPES.items()}
    strat.begin_round(0)
    for c in (0, 1):
        start0 = strat.client_start(c, grads)
        strat.client_upload(c, _factors(gen))
    for n in SHAPES:  # round 0 has no W_rm: the same start as the paper's
        B_ga, A_ga = gradient_aligned_factors(grads[n], R, 16.0)
        torch.testing.assert_close(_dense(start0.offsets[n]), -B_ga @ A_ga)
    strat.receive_update(strat.aggregate(dict(strat._client_uploads), {0: 1.0, 1: 2.0}))
    strat.begin_round(1)
    W_rm = {n: _dense(f).double() for n, f in strat.round_matching(0).items()}
    start = strat.client_start(0, grads)
    trained = {n: (B + 0.1 * torch.randn(B.shape, generator=gen, dtype=B.dtype),
                   A + 0.1 * torch.randn(A.shape, generator=gen, dtype=A.dtype)) for n, (B, A) in start.lora.items()}
    upload = strat.client_upload(0, trained)
    for n in SHAPES:
        B_ga, A_ga = gradient_aligned_factors(grads[n], R, 16.0)
        torch.testing.assert_close(_dense(start.lora[n]).double(), B_ga @ A_ga)
        # effective start W + s (lora + offset) = W + s W_rm, exactly
        torch.testing.assert_close(_dense(start.lora[n]).double() + _dense(start.offsets[n]).double(), W_rm[n],
                                   rtol=1e-5, atol=1e-6)
        expect = _best_rank(_dense(trained[n]).double() - B_ga @ A_ga + W_rm[n], R)
        torch.testing.assert_close(_dense(upload[n]).double(), expect, rtol=1e-4, atol=1e-5)
    assert strat.round_metrics()["rm_kept_median"] == 1.0
    with pytest.raises(ValueError, match="exact_round_matching"):
        get_strategy("fedsmoothlora", rank=R, exact_round_matching=True, ga_init=False)
