"""A crashed Flower ServerApp resumes from its last checkpoint and ends on the uninterrupted run's weights.

docs/flower.md's resume command (``flwr run ... --run-config 'resume-from-checkpoint="latest"'``) sets
one run-config key; the simulated federation below sets the same key on the same ServerApp.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_task import ServerCrash, build_trainer

from fedsmooth_hf.flower.node import ClientNode, federation_fingerprint
from fedsmooth_hf.flower.server_log import ServerLog
from fedsmooth_hf.flower.wire import arrays_to_factors, factors_to_arrays, update_to_arrays

TESTS = Path(__file__).resolve().parents[1]


def test_node_goes_back_to_where_a_resumed_server_left_it(tmp_path, model_dir):
    """Three rounds on one node, then a server resumed after round 2 (0-based update 1 is its last): the node
    rebuilt from disk is back at update 2 without its round-3 training, and redoes round 3 bit for bit."""
    config = {"model-path": str(model_dir), "num-clients": 2, "trainer-output-dir": str(tmp_path / "out")}
    server = build_trainer(None, config)
    fingerprint = {f"fp-{k}": v for k, v in federation_fingerprint(server).items()}

    def message(round_idx, first, count, checkpointed):
        return {"action": "train", "round": round_idx, "first_update": first, "num_updates": count,
                "run_token": "run-1", "finish": False, "resumable": True, "checkpointed": checkpointed,
                **fingerprint}

    node = ClientNode(build_trainer(1, config), 1, tmp_path / "client", "run-1")
    arrays, uploads, updates = factors_to_arrays("init", server.strategy.init_lora), [], []
    for round_idx in range(3):
        _, upload = node.handle(message(round_idx, round_idx - 1 if round_idx else 0, 1 if round_idx else 0,
                                        round_idx), arrays)
        uploads.append(upload)
        server.strategy.begin_round(round_idx)
        update = server.strategy.aggregate({1: arrays_to_factors("lora", upload)}, {1: 1.0})
        server.apply_server_update(update)
        if round_idx == 1:
            after_two = {n: layer.get_base_layer().weight.clone() for n, layer in server.layers.items()}
        updates.append(update_to_arrays(round_idx, update, {}))
        arrays = updates[-1]
    kept = json.loads((tmp_path / "client" / "node.json").read_text())
    assert kept["last_trained"] == 2 and kept["applied"] == 2
    # pruned: the round-3 messages said round 2 is checkpointed; nothing before its resume point is kept
    assert [(s["applied"], s["last_trained"]) for s in kept["snapshots"]] == [(2, 1), (2, 2)]
    assert len(list((tmp_path / "client" / "states").glob("*.safetensors"))) == 2

    resumed = ClientNode(build_trainer(1, config), 1, tmp_path / "client", "run-1", resume_round=2)
    assert resumed.applied == 2 and resumed.last_trained == 1
    _, again = resumed.handle(message(2, 2, 0, 2), {})
    assert again.keys() == uploads[2].keys()
    for key in uploads[2]:
        assert np.array_equal(again[key], uploads[2][key]), key
    for name, layer in resumed.trainer.layers.items():  # the base is the server's after two updates
        assert torch.equal(layer.get_base_layer().weight, after_two[name]), name
    # further back than the kept states go: refused with the reason, nothing changed on disk
    with pytest.raises(RuntimeError, match="kept no earlier state"):
        ClientNode(build_trainer(1, config), 1, tmp_path / "client", "run-1", resume_round=1)


def test_server_log_resumes_its_token_and_updates_and_refuses_another_run(tmp_path):
    log = ServerLog(tmp_path / "flower-server", {"fp-seed": 7})
    log.start("run-42")
    for k in range(3):
        log.append(k, {f"u{k}/merge/m/B": np.full((2, 1), k, np.float32)})
    token, updates = log.resume(2)
    assert token == "run-42" and [float(u[f"u{k}/merge/m/B"][0, 0]) for k, u in enumerate(updates)] == [0, 1]
    assert not (tmp_path / "flower-server" / "updates" / "update-2.safetensors").exists()  # redone after resume
    with pytest.raises(FileNotFoundError, match="update 2"):
        log.resume(3)
    with pytest.raises(ValueError, match="ran with"):
        ServerLog(tmp_path / "flower-server", {"fp-seed": 8}).resume(1)
    with pytest.raises(FileNotFoundError, match="run.json is missing"):
        ServerLog(tmp_path / "elsewhere", {"fp-seed": 7}).resume(1)


def test_crashed_server_resumes_and_ends_on_the_uninterrupted_runs_weights(tmp_path, model_dir, monkeypatch):
    """The ServerApp dies in round 3 after every client trained (their state moved on); a second
    ServerApp with ``resume-from-checkpoint = "latest"`` goes on from round-2 and ends where an uninterrupted
    in-process run ends."""
    from flwr.simulation import run_simulation

    from fedsmooth_hf.flower import make_client_app, make_server_app

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent), *sys.path]))
    config = {"model-path": str(model_dir), "strategy": "fedsmoothlora", "save-rounds": 1,
              "trainer-output-dir": str(tmp_path / "server"), "client-state-dir": str(tmp_path / "clients"),
              "output-dir": str(tmp_path / "merged")}
    finished = {}

    def federate(server_config):
        run_simulation(make_server_app(build_trainer, server_config, on_finish=lambda t: finished.update(trainer=t)),
                       make_client_app(build_trainer, config), num_supernodes=4,
                       backend_config={"client_resources": {"num_cpus": 2}})

    with pytest.raises(ServerCrash, match="round 3"):
        federate({**config, "crash-in-round": 3})
    assert "trainer" not in finished  # the first server never finished
    assert sorted(p.name for p in (tmp_path / "server").glob("round-*")) == ["round-1", "round-2"]
    for c in range(4):  # every client trained round 3 before the crash
        assert json.loads((tmp_path / "clients" / f"partition-{c}" / "node.json").read_text())["last_trained"] == 2

    federate({**config, "resume-from-checkpoint": "latest"})
    federated = finished["trainer"]
    reference = build_trainer(None, {**config, "trainer-output-dir": str(tmp_path / "reference")})
    reference.train()
    got, want = federated.merged_state_dict(), reference.merged_state_dict()
    for name in want:  # the tolerance only allows for another BLAS thread count in the Ray actor
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    rounds = [r for r in federated.round_history if not r.get("final_sync")]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for got_r, want_r in zip(rounds, reference.round_history):
        assert got_r["client_train_loss"] == pytest.approx(want_r["client_train_loss"], abs=1e-6)
    final = federated.round_history[-1]
    assert set(final["client_base_weight_sum"].values()) == {final["server_base_weight_sum"]}
    for c in range(4):  # restored from their state dirs, not trained from scratch
        node = json.loads((tmp_path / "clients" / f"partition-{c}" / "node.json").read_text())
        assert node["loads"] >= 2 and node["applied"] == 3 and node["last_trained"] == 2
