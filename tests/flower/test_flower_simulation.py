"""Flower simulation engine (Ray actors, real Flower messages): same weights as FederatedTrainer in-process."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from flower_task import build_trainer
from flwr.simulation import run_simulation
from transformers import LlamaForCausalLM

from fedsmooth_hf.flower import make_client_app, make_server_app

TESTS = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("strategy", ["fedsmoothlora", "fedit", "ffa_lora"])
def test_simulation_matches_in_process_trainer(tmp_path, model_dir, strategy, monkeypatch):
    # Ray actors import the builder module by name
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent), *sys.path]))
    config = {"model-path": str(model_dir), "strategy": strategy, "trainer-output-dir": str(tmp_path / "server"),
              "client-state-dir": str(tmp_path / "clients"), "output-dir": str(tmp_path / "merged")}
    finished = {}
    run_simulation(make_server_app(build_trainer, config, on_finish=lambda t: finished.update(trainer=t)),
                   make_client_app(build_trainer, config), num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 2}})  # one actor: 2 cores here
    federated = finished["trainer"]

    reference = build_trainer(None, {**config, "trainer-output-dir": str(tmp_path / "reference")})
    reference.train()
    got, want = federated.merged_state_dict(), reference.merged_state_dict()
    assert got.keys() == want.keys()
    for name in want:
        # same seeds, same split, same float ops in the same order: observed bit-identical;
        # the tolerance only allows for a different BLAS thread count in the Ray actor
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    pretrained = LlamaForCausalLM.from_pretrained(model_dir).state_dict()
    moved = max((got[n] - pretrained[n]).abs().max().item() for n in got if n.endswith("proj.weight"))
    assert moved > 1e-3, "training must have changed the adapted weights"

    rounds = [r for r in federated.round_history if not r.get("final_sync")]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["clients"] for r in rounds] == [[0, 1, 2, 3]] * 3
    for got_r, want_r in zip(rounds, reference.round_history):
        assert got_r["client_train_loss"] == pytest.approx(want_r["client_train_loss"], abs=1e-6)

    # what crossed the wire per client and round: r (d_in + d_out) float32 per module, plus headers;
    # FFA-LoRA's A is frozen and shared, so only its B (r d_out) travels
    r, ffa = federated.lora_rank, strategy == "ffa_lora"
    lora_bytes = sum(r * (layer.out_features + (0 if ffa else layer.in_features)) * 4
                     for layer in federated.layers.values())
    n_arrays = (1 if ffa else 2) * len(federated.layers)
    for record in rounds:
        for c in map(str, record["clients"]):
            assert record["upload_lora_bytes"][c] == lora_bytes
            assert 0 < record["upload_bytes"][c] - lora_bytes <= 200 * n_arrays  # npy header + key per array
        assert record["model_bytes"] > 5 * lora_bytes
    # every client ends on the server's base weights
    final = federated.round_history[-1]
    assert final["final_sync"] and len(final["client_base_weight_sum"]) == 4
    for value in final["client_base_weight_sum"].values():
        assert value == final["server_base_weight_sum"]
    # the merged model and its history were written where the run config says
    assert (tmp_path / "merged" / "federated_history.json").is_file()
    # each client loaded its model once and kept it across the rounds
    for c in range(4):
        node = json.loads((tmp_path / "clients" / f"partition-{c}" / "node.json").read_text())
        assert node["loads"] == 1 and node["applied"] == 3
        # a run that does not checkpoint cannot resume: nobody keeps states or updates for it
        assert node["snapshots"] == [] and not (tmp_path / "clients" / f"partition-{c}" / "states").exists()
    assert not (tmp_path / "server" / "flower-server").exists()
    # FedSmoothLoRA's per-client state lives with the client, on disk
    if strategy == "fedsmoothlora":
        from safetensors.torch import load_file

        state = load_file(str(tmp_path / "clients" / "partition-2" / "strategy.safetensors"))
        owners = {k.split("/", 1)[0].split("@")[0] for k in state if k.startswith("client")}
        assert owners == {"client2"}  # only its own upload (prefix client2@<round of the upload>)
        assert any(k.startswith("client2@2/") for k in state)  # uploaded in round 3 (0-based 2)


def test_simulation_per_client_evaluation_and_declared_ranks_match_in_process(tmp_path, model_dir, monkeypatch):
    """Nodes evaluate their own held-out split and train the rank they declare, as the in-process run does.

    Nodes send metrics only; the server, told nothing of the ranks, adopts them. Records and weights are
    the in-process run's.
    """
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent), *sys.path]))
    # FRLoRA: the server's aggregate restarts each client at its own rank, so it must know the ranks
    config = {"model-path": str(model_dir), "strategy": "frlora", "trainer-output-dir": str(tmp_path / "server"),
              "client-state-dir": str(tmp_path / "clients"), "output-dir": str(tmp_path / "merged"),
              "client-eval-fraction": 0.25, "eval-rounds": 1}
    ranks = "2,4"  # clients 0, 2: rank 2; clients 1, 3: rank 4 (lora_r)
    finished = {}
    run_simulation(make_server_app(build_trainer, config, on_finish=lambda t: finished.update(trainer=t)),
                   make_client_app(build_trainer, {**config, "client-ranks": ranks}), num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 2}})
    federated = finished["trainer"]
    assert [federated.strategy.client_rank(c) for c in range(4)] == [2, 4, 2, 4]  # adopted from the nodes

    reference = build_trainer(None, {**config, "client-ranks": ranks,
                                     "trainer-output-dir": str(tmp_path / "reference")})
    reference.train()
    got, want = federated.merged_state_dict(), reference.merged_state_dict()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)

    rounds = [r for r in federated.round_history if not r.get("final_sync")]
    assert [r["round"] for r in rounds] == [r["round"] for r in reference.round_history] == [0, 1, 2, 3]
    for got_r, want_r in zip(rounds, reference.round_history):
        keys = sorted(k for k in want_r if k.startswith("client_eval"))
        assert "client_eval_loss_worst" in keys and sorted(k for k in got_r if k.startswith("client_eval")) == keys
        for key in keys:
            if key == "client_eval":  # every client's own metrics, computed on its node
                assert got_r[key].keys() == want_r[key].keys() == {"0", "1", "2", "3"}
                for c in want_r[key]:
                    assert got_r[key][c] == pytest.approx(want_r[key][c], abs=1e-6), (got_r["round"], c)
            else:
                assert got_r[key] == pytest.approx(want_r[key], abs=1e-6), (got_r["round"], key)
    # each node's upload has its rank: r_c (d_in + d_out) float32 per module
    per_rank = {k: sum(k * (layer.in_features + layer.out_features) * 4 for layer in federated.layers.values())
                for k in (2, 4)}
    for record in rounds[1:]:
        assert record["upload_lora_bytes"] == {str(c): per_rank[(2, 4)[c % 2]] for c in range(4)}
