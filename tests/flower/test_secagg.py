"""Secure aggregation under Flower (Flower's SecAgg+): the server sees only sums, the aggregate is the
unprotected one up to SecAgg+'s quantization, a round survives a client that drops out after sharing its
keys, and options that cannot be served fail with one clear error."""

import os
import sys
from pathlib import Path

import pytest
import torch
from flower_task import build_trainer
from flwr.simulation import run_simulation
from support.flower_cluster import DropOutAtStage

from fedsmooth_hf.flower import FederationError, FlowerExecutor, make_client_app, make_server_app

TESTS = Path(__file__).resolve().parents[1]


def _config(tmp_path, model_dir, strategy, **more):
    return {"model-path": str(model_dir), "strategy": strategy, "trainer-output-dir": str(tmp_path / "server"),
            "client-state-dir": str(tmp_path / "clients"), "output-dir": str(tmp_path / "merged"), **more}


def _simulate(config, mods=None):
    finished = {}
    run_simulation(make_server_app(build_trainer, config, on_finish=lambda t: finished.update(trainer=t)),
                   make_client_app(build_trainer, config, mods=mods), num_supernodes=int(config["num-clients"]),
                   backend_config={"client_resources": {"num_cpus": 2}})  # one actor: 2 cores here
    assert "trainer" in finished, "the federation did not finish (see the ServerApp's log above)"
    return finished["trainer"]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("strategy", ["fedit", "flexlora"])  # linear: one secure sum; product: two (the sketch)
def test_secure_aggregate_matches_the_unprotected_one(tmp_path, model_dir, strategy, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent), *sys.path]))
    # one round: the clients' uploads are then the reference run's to the bit, and the aggregates compare
    # alone (a later round's clients start from slightly different points and train apart)
    config = _config(tmp_path, model_dir, strategy, **{"num-clients": 4, "num-rounds": 1})
    federated = _simulate({**config, "secure-aggregation": True})
    reference = build_trainer(None, {**config, "trainer-output-dir": str(tmp_path / "reference")})
    reference.train()

    rounds = [r for r in federated.round_history if not r.get("final_sync")]
    assert [r["round"] for r in rounds] == [1]
    for record in rounds:
        assert record["secure_clients"] == [0, 1, 2, 3] and record["failed_clients"] == {}
        # what each client sent in the clear: metrics only, no factor
        assert set(record["upload_lora_bytes"].values()) == {0}
        # product strategies: two exchanges (the sketch's passes), linear ones: one
        assert set(record["secure_sum_entries"]) == ({"sketch", "final"} if strategy == "flexlora" else {"final"})
    # the round's update: within 1e-3 of the unprotected run's (SecAgg+ rounds every entry)
    got, want = federated.merged_state_dict(), reference.merged_state_dict()
    base = build_trainer(None, {**config, "trainer-output-dir": str(tmp_path / "base")}).merged_state_dict()
    moved = [n for n in want if n.endswith("proj.weight") and not torch.equal(want[n], base[n])]
    assert moved, "training must have changed the adapted weights"
    errors = {name: _relative(got[name] - base[name], want[name] - base[name]) for name in moved}
    print(f"\n{strategy} over SecAgg+: largest relative error of a weight's change {max(errors.values()):.2e}")
    for name, error in errors.items():
        assert error < 1e-3, name
    for name, (B, A) in reference.strategy.global_lora().items():
        gB, gA = federated.strategy.global_lora()[name]
        assert _relative(gB @ gA, B @ A) < 1e-3, name
        assert not torch.equal(gB @ gA, B @ A)  # it did go through SecAgg+'s quantization


def test_round_completes_when_a_client_drops_out_after_sharing_its_keys(tmp_path, model_dir, monkeypatch):
    """Of 3 clients, partition 2 shares its key shares, then never sends its masked vector: the shares
    its 2 neighbours hold (reconstruction threshold 0.67 of 3 shares: 2) rebuild its pairwise masks and
    the sum covers the other two."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent), *sys.path]))
    config = _config(tmp_path, model_dir, "fedit", **{"num-clients": 3, "num-rounds": 1, "min-fit-fraction": 0.6})
    federated = _simulate({**config, "secure-aggregation": True},
                          mods=[DropOutAtStage(2, "collect_masked_vectors", round_number=1)])
    record = federated.round_history[0]
    assert record["secure_clients"] == [0, 1]
    assert list(record["failed_clients"]) == ["2"]
    assert "dropped out of the secure aggregation" in record["failed_clients"]["2"]
    assert "injected drop-out" in record["failed_clients"]["2"]

    # the aggregate is the example-weighted mean of the two that finished
    reference = build_trainer(None, {**config, "trainer-output-dir": str(tmp_path / "reference")})
    results = {c: reference.train_client_round(0, c) for c in range(2)}
    want = reference.strategy.aggregate({c: r.upload for c, r in results.items()},
                                        {c: float(r.num_examples) for c, r in results.items()}).global_lora
    for name, (B, A) in want.items():
        gB, gA = federated.strategy.global_lora()[name]
        assert _relative(gB, B) < 1e-3 and _relative(gA, A) < 1e-3, name


@pytest.mark.parametrize("option, value, named", [
    ("secure-aggregation-num-shares", 2, "secure-aggregation-num-shares"),
    ("secure-aggregation-reconstruction-threshold", 1.5, "secure-aggregation-reconstruction-threshold"),
    ("secure-aggregation-clipping-range", 0.0, "secure-aggregation-clipping-range"),
    ("secure-aggregation-quantization-rnage", 2**20, "secure-aggregation-quantization-rnage"),
])
def test_bad_secure_aggregation_option_is_one_clear_error(option, value, named):
    with pytest.raises(FederationError, match=named):
        FlowerExecutor(None, None, {"secure-aggregation": True, option: value}, run_token="t")


@pytest.mark.parametrize("more, named", [
    ({"client-eval-fraction": 0.25}, "client_eval_fraction"),  # per-client metrics would leave in the clear
    ({"num-clients": 1}, "clients_per_round"),  # a sum of one client is its upload
])
def test_run_that_secure_aggregation_cannot_serve_is_refused(tmp_path, model_dir, more, named):
    trainer = build_trainer(None, _config(tmp_path, model_dir, "fedsmoothlora", **more))
    executor = FlowerExecutor(None, trainer, {"secure-aggregation": True}, run_token="t")
    with pytest.raises(FederationError, match=named):
        executor.install_secure_release()
    assert trainer.privacy is None  # nothing was installed
