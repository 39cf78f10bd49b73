"""Flower deployment engine: a SuperLink and SuperNodes as separate processes on 127.0.0.1.

One secure cluster for the module: TLS on every SuperLink API (a CA and server
certificate made in the test) and SuperNode authentication (registered EC keys).
"""

import json
import os
import signal
import socket
import ssl
import time

import pytest
import torch
from flower_task import build_trainer
from safetensors.torch import load_file
from support.flower_cluster import Cluster, make_node_key, write_app
from support.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("flower")
    make_tiny_llama().save_pretrained(root / "model")
    cluster = Cluster(root, secure=True)
    try:
        cluster.start_superlink()
        for i in range(2):
            private, public = make_node_key(root, f"node{i}")
            cluster.register(public)
            # client 0 is a "multi-GPU silo": its local rounds run on an accelerate launch group (1 CPU process here)
            cluster.start_supernode(f"supernode{i}", i, root / "clients" / f"partition-{i}", private,
                                    launcher="accelerate launch --num_processes 1 --cpu" if i == 0 else "")
        yield cluster
    finally:
        cluster.close()


def _app_config(cluster, name, **overrides):
    root = cluster.root
    return {"model-path": str(root / "model"), "strategy": "fedsmoothlora", "num-clients": 2, "num-rounds": 2,
            "trainer-output-dir": str(root / name / "server"), "output-dir": str(root / name / "merged"),
            "round-timeout": 0.0, "min-fit-fraction": 1.0, **overrides}


def _run(cluster, name, config, timeout=600):
    proc = cluster.run_app(write_app(cluster.root / name / "app", config), name)
    return proc


def _history(config):
    with open(os.path.join(config["output-dir"], "federated_history.json")) as f:
        return json.load(f)["round_history"]


def test_two_supernodes_match_in_process_run_and_unregistered_key_is_refused(cluster, tmp_path):
    intruder_key, _ = make_node_key(tmp_path, "intruder")  # never registered
    intruder = cluster.start_supernode("intruder", 0, tmp_path / "intruder", intruder_key)
    config = _app_config(cluster, "full")
    run = _run(cluster, "full", config)
    assert run.wait(timeout=600) == 0, cluster.log("full")[-3000:]
    history = _history(config)
    rounds = [r for r in history if "clients" in r]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["failed_clients"] == {} for r in rounds), history

    # the same federation in one process: the same merged weights
    reference = build_trainer(None, {**config, "trainer-output-dir": str(tmp_path / "reference")})
    reference.train()
    want = reference.merged_state_dict()
    got = load_file(os.path.join(config["output-dir"], "model.safetensors"))
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
    # client 0 trained on its accelerate-launched worker, client 1 on a plain one; the model loaded once each
    for i, launched_by in enumerate(["accelerate", "python"]):
        worker_log = (cluster.root / "clients" / f"partition-{i}" / "worker.log").read_text()
        assert f"client {i}: rank 0 of 1" in worker_log and f"launched by {launched_by}" in worker_log
        assert worker_log.count("[fedsmooth worker]") == 1
        node = json.loads((cluster.root / "clients" / f"partition-{i}" / "node.json").read_text())
        assert node["loads"] == 1 and node["applied"] == 2
    # clients and server ended on identical base weights
    final = history[-1]
    assert final["client_base_weight_sum"] == {"0": final["server_base_weight_sum"],
                                               "1": final["server_base_weight_sum"]}
    # per client and round only r (d_in + d_out) float32 per module went up, a fraction of the model
    r = reference.lora_rank
    lora_bytes = sum(r * (layer.in_features + layer.out_features) * 4 for layer in reference.layers.values())
    for record in rounds:
        assert set(record["upload_lora_bytes"].values()) == {lora_bytes}
        assert record["model_bytes"] > 5 * lora_bytes

    # the SuperNode with an unregistered key was refused at activation and gave up
    assert intruder.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in cluster.log("intruder")
    assert "No SuperNode found with the given public key" in cluster.log("superlink")
    # and every API spoke TLS with the test CA's certificate
    context = ssl.create_default_context(cafile=str(cluster.tls["ca"]))
    with socket.create_connection(("127.0.0.1", cluster.port)) as sock:
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_killed_supernode_round_completes_or_fails_as_configured(cluster):
    # min-fit-fraction=0.5: losing one of two clients mid-run still completes every round
    # models load while answering the query, so round-timeout only covers a local round (+ messaging);
    # the dead node costs one round-timeout and one final-sync-timeout
    config = _app_config(cluster, "kill", **{"min-fit-fraction": 0.5, "round-timeout": 30.0,
                                              "final-sync-timeout": 15.0})
    sent_before = cluster.log("supernode1").count("Sent successfully")
    run = _run(cluster, "kill", config)
    deadline = time.monotonic() + 300
    while cluster.log("supernode1").count("Sent successfully") < sent_before + 2:  # query and round 1 answered
        assert time.monotonic() < deadline and run.poll() is None, cluster.log("kill")[-3000:]
        time.sleep(0.5)
    cluster.kill("supernode1")
    worker_pid = cluster.root / "clients" / "partition-1" / "worker.pid"
    os.killpg(int(worker_pid.read_text()), signal.SIGKILL)  # the whole client machine is gone
    assert run.wait(timeout=600) == 0, cluster.log("kill")[-3000:]
    rounds = [r for r in _history(config) if "clients" in r]
    assert rounds[0]["failed_clients"] == {}
    assert list(rounds[1]["failed_clients"]) == ["1"] and "no reply" in rounds[1]["failed_clients"]["1"]
    assert list(rounds[1]["client_train_loss"]) == ["0"]

    # min-fit-fraction=1.0 with the node gone: the run stops with a message that says why
    # (query-timeout: long enough for client 0 to load its model, the dead node never answers)
    config = _app_config(cluster, "strict", **{"min-available-nodes": 1, "query-timeout": 40.0})
    run = _run(cluster, "strict", config)
    run.wait(timeout=600)
    log = cluster.log("strict")
    assert "FederationError: round 1: 1 of 2 sampled clients have a connected SuperNode" in log, log[-3000:]
    assert "min-fit-fraction=1.0 needs 2; failed clients: {1: 'no connected SuperNode" in log, log[-3000:]
    assert not os.path.exists(os.path.join(config["output-dir"], "model.safetensors"))
