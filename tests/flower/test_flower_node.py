"""A federation client's state survives a process restart (no Flower processes: the node alone)."""

import shutil

import pytest
import torch
from flower_task import build_trainer
from support.tiny import make_tiny_llama

from fedsmooth_hf.flower.node import ClientNode, federation_fingerprint
from fedsmooth_hf.flower.wire import arrays_to_factors, factors_to_arrays, update_to_arrays


def test_restarted_client_resumes_from_its_state_dir(tmp_path):
    make_tiny_llama().save_pretrained(tmp_path / "model")
    config = {"model-path": str(tmp_path / "model"), "num-clients": 2, "trainer-output-dir": str(tmp_path / "out")}
    server = build_trainer(None, config)
    fingerprint = {f"fp-{k}": v for k, v in federation_fingerprint(server).items()}

    def message(round_idx, first, count):
        return {"action": "train", "round": round_idx, "first_update": first, "num_updates": count,
                "run_token": "run-1", "finish": False, **fingerprint}

    node = ClientNode(build_trainer(1, config), 1, tmp_path / "client", "run-1")
    _, upload = node.handle(message(0, 0, 0), factors_to_arrays("init", server.strategy.init_lora))
    update = server.strategy.aggregate({1: arrays_to_factors("lora", upload)}, {1: 1.0})
    server.apply_server_update(update)
    shutil.copytree(tmp_path / "client", tmp_path / "client-after-round-1")  # killed before the next message

    metrics, continued = node.handle(message(1, 0, 1), update_to_arrays(0, update, {}))
    assert metrics["applied_updates"] == 1 and metrics["base_weight_sum"] > -1e9

    # a new process: the pretrained model again, the state dir of after round 1
    restarted = ClientNode(build_trainer(1, config), 1, tmp_path / "client-after-round-1", "run-1")
    assert restarted.applied == 0 and restarted.has_initial_adapter and restarted.loads == 2
    own = restarted.trainer.strategy._client_uploads[1]  # FedSmoothLoRA's Round-Matching memory survived
    for name, (B, A) in arrays_to_factors("lora", upload).items():
        assert torch.equal(own[name][0], B) and torch.equal(own[name][1], A)
    _, resumed = restarted.handle(message(1, 0, 1), update_to_arrays(0, update, {}))
    for name, layer in restarted.trainer.layers.items():  # in step with the server again
        assert torch.equal(layer.get_base_layer().weight, server.layers[name].get_base_layer().weight)
    assert resumed.keys() == continued.keys()
    for key in continued:
        assert (resumed[key] == continued[key]).all(), key

    # a new process that also lost the updates is told which ones it misses
    again = ClientNode(build_trainer(1, config), 1, tmp_path / "client-after-round-1", "run-1")
    assert again.applied == 1  # the round-1 update it applied above is replayed from disk
    with pytest.raises(RuntimeError, match="missing"):
        again.handle(message(3, 2, 1), {})
    # a server that disagrees on the federation is refused with the difference named
    with pytest.raises(ValueError, match="seed"):
        again.handle({**message(1, 1, 0), "fp-seed": 8}, {})


def test_worker_process_group_trains_and_answers_through_rank_0(tmp_path):
    """A multi-process client (launcher): 2 CPU ranks under torchrun, the ClientApp talks to rank 0 only."""
    import sys
    from pathlib import Path

    import numpy as np
    from support.flower_cluster import free_port

    from fedsmooth_hf.flower.worker import call_worker

    make_tiny_llama().save_pretrained(tmp_path / "model")
    config = {"model-path": str(tmp_path / "model"), "num-clients": 2, "trainer-output-dir": str(tmp_path / "out")}
    server = build_trainer(None, config)
    fingerprint = {f"fp-{k}": v for k, v in federation_fingerprint(server).items()}
    spec = {"builder": "flower_task:build_trainer", "client": 1, "state_dir": str(tmp_path / "client"),
            "config": config, "idle_timeout": 300}
    launcher = f"{Path(sys.executable).parent / 'torchrun'} --nproc_per_node 2 --master_port {free_port()}"
    ready, _ = call_worker(spec, ("ready", {"run_token": "run-1"}, {}), launcher)
    assert ready["num_examples"] == 32
    message = {"action": "train", "round": 0, "first_update": 0, "num_updates": 0, "run_token": "run-1",
               "finish": True, **fingerprint}
    metrics, upload = call_worker(spec, ("handle", message, factors_to_arrays("init", server.strategy.init_lora)),
                                  launcher)
    r = server.lora_rank
    for name, layer in server.layers.items():
        assert upload[f"lora/{name}/B"].shape == (layer.out_features, r)
        assert upload[f"lora/{name}/A"].shape == (r, layer.in_features)
        assert np.isfinite(upload[f"lora/{name}/B"]).all()
    assert np.isfinite(metrics["train_loss"])
    log = (tmp_path / "client" / "worker.log").read_text()
    assert "client 1: rank 0 of 2" in log and "client 1: rank 1 of 2" in log
    assert (tmp_path / "client" / "node.json").is_file()  # written by rank 0


def test_node_config_client_rank_is_declared_and_uploaded(tmp_path):
    """``client-rank`` in a node's config: the node says it when asked and uploads factors of that rank."""
    from fedsmooth_hf.flower.node import NodeCache

    make_tiny_llama().save_pretrained(tmp_path / "model")
    config = {"model-path": str(tmp_path / "model"), "num-clients": 2, "trainer-output-dir": str(tmp_path / "out"),
              "strategy": "fedit"}
    server = build_trainer(None, config)
    fingerprint = {f"fp-{k}": v for k, v in federation_fingerprint(server).items()}
    nodes = NodeCache()
    ready, _ = nodes.serve(build_trainer, 1, {**config, "client-rank": 2}, tmp_path / "client",
                           ("ready", {"run_token": "run-1"}, {}))
    assert ready["client_rank"] == 2 and server.lora_rank == 4
    message = {"action": "train", "round": 0, "first_update": 0, "num_updates": 0, "run_token": "run-1",
               "finish": False, **fingerprint}
    _, upload = nodes.serve(build_trainer, 1, {**config, "client-rank": 2}, tmp_path / "client",
                            ("handle", message, factors_to_arrays("init", server.strategy.init_lora)))
    for name, layer in server.layers.items():
        assert upload[f"lora/{name}/B"].shape == (layer.out_features, 2)
        assert upload[f"lora/{name}/A"].shape == (2, layer.in_features)


def test_worker_of_another_run_config_is_replaced_not_reused(tmp_path):
    """A run that failed leaves its worker up (until worker-idle-timeout); the next run on the node, with
    another run config, must get a worker built from its own config, not the old run's trainer."""
    import os
    import time

    from fedsmooth_hf.flower.worker import call_worker, socket_path

    make_tiny_llama().save_pretrained(tmp_path / "model")
    config = {"model-path": str(tmp_path / "model"), "num-clients": 2, "trainer-output-dir": str(tmp_path / "out")}
    state = tmp_path / "client"
    spec = {"builder": "flower_task:build_trainer", "client": 1, "state_dir": str(state), "config": config,
            "idle_timeout": 300}
    ready, _ = call_worker(spec, ("ready", {"run_token": "run-1"}, {}))
    assert ready["num_examples"] == 32
    first_pid = (state / "worker.pid").read_text()
    again, _ = call_worker(spec, ("ready", {"run_token": "run-1"}, {}))  # same run: the same worker answers
    assert again["num_examples"] == 32 and (state / "worker.pid").read_text() == first_pid
    other = {**spec, "config": {**config, "num-examples": 96}}
    ready, _ = call_worker(other, ("ready", {"run_token": "run-2"}, {}))
    assert ready["num_examples"] == 48  # the new run's data, from a new worker
    assert (state / "worker.pid").read_text() != first_pid
    assert (state / "worker.log").read_text().count("[fedsmooth worker]") == 2
    call_worker(other, ("shutdown",))
    deadline = time.monotonic() + 30
    while os.path.exists(socket_path(state)):  # the worker removes its socket as it exits
        assert time.monotonic() < deadline
        time.sleep(0.1)
