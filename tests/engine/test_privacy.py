"""Client-level DP in the round engine: sampling, clipping, the ledger, resume, bad input, the card."""

from __future__ import annotations

import math

import pytest
import torch
from support.trainers import federated_args, tiny_trainer

from fedsmooth_hf.engine import privacy
from fedsmooth_hf.engine.privacy import (
    RDP_ORDERS,
    calibrate_noise_multiplier,
    epsilon_after,
    poisson_sample,
    round_noise_multiplier,
)
from fedsmooth_hf.math.privacy import linear_norm, product_norm
from fedsmooth_hf.strategies import available_strategies

DP = dict(num_clients=8, clients_per_round=4, num_rounds=2, local_steps=2, eval_rounds=0, save_rounds=-1,
          dp_noise_multiplier=0.8, dp_clip_norm=0.05)


def test_epsilon_is_the_accountants_and_matches_opacus():
    """Golden (q, z, rounds): dp-accounting's RDP epsilon, cross-checked against opacus' RDP accountant."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    q, z, rounds, delta = 0.05, 1.1, 300, 1e-5
    ours = epsilon_after(rounds, q, z, delta)
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=rounds, orders=list(RDP_ORDERS))
    theirs, _ = opacus_rdp.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    assert ours == pytest.approx(theirs, rel=0.05)  # the two conversions to (epsilon, delta) differ slightly
    assert ours <= theirs + 1e-9  # dp-accounting's conversion is the tighter one
    assert epsilon_after(0, q, z, delta) == 0.0 and epsilon_after(3, q, 0.0, delta) == math.inf


def test_two_sketch_passes_cost_like_one_gaussian_of_z_over_sqrt_two():
    assert round_noise_multiplier(2.0, 2) == pytest.approx(2.0 / math.sqrt(2))
    assert round_noise_multiplier(2.0, 1, count_stddev=1.0) == pytest.approx((1 / 4 + 1 / 4) ** -0.5)


def test_calibration_round_trip_and_an_unreachable_target():
    z = calibrate_noise_multiplier(8.0, 1e-5, rounds=50, rate=0.1, releases=2)
    spent = epsilon_after(50, 0.1, round_noise_multiplier(z, 2), 1e-5)
    assert spent <= 8.0 and spent == pytest.approx(8.0, rel=0.01)
    with pytest.raises(ValueError, match="dp_target_epsilon=1e-06 cannot be reached"):
        calibrate_noise_multiplier(1e-6, 1e-5, rounds=1000, rate=1.0, releases=2, largest=10.0)


def test_poisson_sampling_draws_each_client_at_the_rate_independently():
    draws = [poisson_sample(50, 0.2, seed=0, round_idx=r) for r in range(400)]
    assert sum(len(d) for d in draws) / (400 * 50) == pytest.approx(0.2, abs=0.01)
    assert poisson_sample(50, 0.2, 0, 7) == draws[7] and len({len(d) for d in draws}) > 5


@pytest.mark.parametrize("strategy", available_strategies())
def test_the_server_only_receives_clipped_contributions(tmp_path, monkeypatch, strategy):
    """Every contribution that reaches a release is within C, for every strategy, with mixed client ranks."""
    seen = []

    def capture(mechanism, measure):
        def wrapped(contributions, scales, *args, **kwargs):
            seen.extend(measure(c) * s for c, s in zip(contributions, scales))
            return mechanism(contributions, scales, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(privacy, "noisy_linear_sum", capture(privacy.noisy_linear_sum, linear_norm))
    monkeypatch.setattr(privacy, "noisy_product_sum", capture(privacy.noisy_product_sum, product_norm))
    trainer = tiny_trainer(tmp_path, fed={**DP, "strategy": strategy, "client_ranks": [2, 4]}, learning_rate=0.5)
    trainer.train()
    assert seen and max(seen) <= 0.05 * (1 + 1e-5)
    assert any(r["dp_clipped_share"] > 0 for r in trainer.round_history)  # lr 0.5: some updates were clipped


@pytest.mark.parametrize("strategy", ["fedit", "ffa_lora", "flexlora", "fedsmoothlora", "fedex_lora", "frlora"])
def test_no_noise_and_no_clipping_equals_the_plain_run_with_uniform_weights(tmp_path, strategy):
    """z = 0, a huge C, every client every round, equal client sizes: the DP path is the plain aggregate
    (the sketch is wide enough to be exact)."""
    plain = dict(num_clients=4, num_rounds=2, local_steps=2, eval_rounds=0, save_rounds=-1, strategy=strategy)
    ref = tiny_trainer(tmp_path / "plain", fed=plain)
    ref.train()
    dp = tiny_trainer(tmp_path / "dp", fed={**plain, "dp_noise_multiplier": 0.0, "dp_clip_norm": 1e9,
                                            "dp_sketch_width": 64, "dp_delta": 1e-3})
    dp.train()
    for name, layer in ref.layers.items():
        torch.testing.assert_close(dp.layers[name].get_base_layer().weight, layer.get_base_layer().weight,
                                   atol=2e-5, rtol=1e-4)
    assert dp.round_history[-1]["dp_epsilon"] == math.inf


def test_resume_continues_the_ledger_bit_identically(tmp_path):
    fed = {**DP, "num_rounds": 3, "save_rounds": 1, "dp_clipping": "adaptive"}
    whole = tiny_trainer(tmp_path / "whole", fed=fed)
    whole.train()
    first = tiny_trainer(tmp_path / "resumed", fed={**fed, "num_rounds": 2})
    first.train()
    resumed = tiny_trainer(tmp_path / "resumed", fed=fed)
    resumed.train(resume_from_checkpoint=True)
    keys = ("dp_epsilon", "dp_clip_norm", "dp_next_clip_norm", "dp_clients", "merge_norm")
    assert [{k: r[k] for k in keys} for r in resumed.round_history] == \
        [{k: r[k] for k in keys} for r in whole.round_history]
    changed = tiny_trainer(tmp_path / "resumed", fed={**fed, "num_rounds": 4, "dp_noise_multiplier": 0.9})
    with pytest.raises(ValueError, match="dp_noise_multiplier=0.8"):
        changed.train(resume_from_checkpoint=True)


def test_the_model_card_states_the_guarantee(tmp_path):
    trainer = tiny_trainer(tmp_path, fed=DP)
    trainer.train()
    trainer.save_model(str(tmp_path / "model"))
    card = (tmp_path / "model" / "README.md").read_text()
    eps = trainer.round_history[-1]["dp_epsilon"]
    assert "## Differential privacy" in card and f"epsilon = {eps:.3g}" in card
    for row in ("| noise_multiplier | 0.8 |", "| clip_norm | 0.05 |", "| sampling_rate | 0.5 |", "accountant"):
        assert row in card


@pytest.mark.parametrize("overrides, field", [
    ({"dp_noise_multiplier": -1.0}, "dp_noise_multiplier"),
    ({"dp_clip_norm": 0.0}, "dp_clip_norm"),
    ({"dp_clip_norm": None}, "dp_clip_norm"),
    ({"dp_target_epsilon": 1.0}, "dp_target_epsilon"),  # together with a noise multiplier
    ({"dp_delta": 0.5}, "dp_delta"),
    ({"dp_clipping": "median"}, "dp_clipping"),
    ({"client_eval_fraction": 0.2}, "client_eval_fraction"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_bad_privacy_settings_name_the_argument(overrides, field):
    with pytest.raises(ValueError, match=f"FederatedArguments.{field}="):
        federated_args(**{**DP, **overrides})
    federated_args(**{**DP, "client_eval_fraction": 0.2, "dp_allow_client_metrics": True})  # opted in


def test_a_target_epsilon_out_of_reach_is_refused_before_training(tmp_path):
    fed = {**DP, "dp_noise_multiplier": None, "dp_target_epsilon": 1e-4, "num_rounds": 2000, "clients_per_round": 8}
    with pytest.raises(ValueError, match="cannot be reached in 2000 rounds"):
        tiny_trainer(tmp_path, fed=fed)


def test_few_clients_warn_how_large_the_noise_is(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="fedsmooth_hf.engine.privacy"):
        tiny_trainer(tmp_path, fed=DP)
    assert "the largest update it can carry" in caplog.text
