"""Flower deployment engine: a SuperLink and SuperNodes as separate processes on 127.0.0.1.

One secure cluster for the module, started with the commands of docs/flower.md's deployment
section as written there (read from the doc; only addresses, ports and paths are replaced): TLS
on every SuperLink API with the doc's openssl certificates and SuperNode authentication with its
ssh-keygen keys, registered with ``flwr supernode register``. Each SuperNode has its own data.
"""

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import torch
from flower_task import build_trainer
from safetensors.torch import load_file
from support.doc_commands import ROOT, block_commands
from support.flower_cluster import Cluster, free_port, write_app
from support.tiny import make_tiny_llama, save_tiny_llama_checkpoint

DOC = ROOT / "docs" / "flower.md"
LAUNCHER = "accelerate launch --num_processes 1 --cpu"


def doc_deployment() -> dict[str, list[str]]:
    """The deployment section's commands by program, and its connection (the ``[superlink.myfed]`` TOML)."""
    text = DOC.read_text()
    section = text[text.index("## Deployment"):]
    section = section[:section.index("\n## ", 3)]
    commands: dict[str, list[str]] = {}
    for command in block_commands(DOC):
        if command.text.split()[0] in ("openssl", "ssh-keygen", "flower-superlink", "flower-supernode", "flwr") \
                and command.tested == ["tests/flower/test_flower_deployment.py"]:
            key = "flwr " + command.text.split()[1] if command.text.startswith("flwr ") else command.text.split()[0]
            commands.setdefault(key, []).append(command.text)
    commands["connection"] = [re.search(r"```toml\n(\[superlink\.myfed\].*?)```", section, re.S).group(1)]
    return commands


def _localize(line: str, cluster, k=None, key=None) -> str:
    """The doc's line for this loopback federation: address, ports, key and paths; nothing else."""
    line = line.replace("server.example.org:9093", cluster.address).replace("--host 0.0.0.0", "--host 127.0.0.1")
    line = line.replace("--port 9093", f"--port {cluster.port}").replace("--port 9094", f"--port {free_port()}")
    line = line.replace("/path/to/ca.pem", str(cluster.root / "ca.pem"))
    if k is not None:
        line = line.replace("node_k", f"node_{k if key is None else key}")
        line = line.replace("partition-id=k", f"partition-id={k}")
        line = line.replace("/var/lib/fedsmooth/client", str(cluster.root / "clients" / f"partition-{k}"))
        line = line.replace("/data/mine.jsonl", str(cluster.root / "data" / f"client{k}.jsonl"))
    return line


def _shell(cluster, line: str) -> str:
    done = subprocess.run(["bash", "-ec", line], cwd=cluster.root, env=cluster.env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
    return done.stdout


def start_supernode(cluster, name: str, k: int, launcher: str = "", key=None):
    """The doc's ``flower-supernode`` line for client ``k`` (node 0 adds the documented ``launcher`` key)."""
    line = _localize(doc_deployment()["flower-supernode"][0], cluster, k, key)
    if launcher:
        line = line.replace("local-data=true", f'local-data=true launcher="{launcher}"')
    return cluster._start(name, ["bash", "-c", "exec " + line])


def _client_data(path, k: int, rows: int = 24):
    """Client k's own instruction data (its words, its category)."""
    lines = [json.dumps({"instruction": f"Repeat the word number {i} of client {k}.", "output": f"word {i} {k}",
                         "category": f"client{k}"}) for i in range(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("flower")
    make_tiny_llama().save_pretrained(root / "model")
    cluster = Cluster(root, secure=False)  # the doc's TLS and keys below, not the helper's
    doc = doc_deployment()
    try:
        for line in doc["openssl"]:
            _shell(cluster, line)
        cluster.secure = True
        cluster.tls = {"ca": root / "ca.pem", "cert": root / "server.pem", "key": root / "server.key"}
        (root / "flwr_home" / "config.toml").write_text(
            '[superlink]\ndefault = "myfed"\n\n' + _localize(doc["connection"][0], cluster))
        superlink = cluster._start("superlink", ["bash", "-c", "exec " + _localize(doc["flower-superlink"][0],
                                                                                   cluster)])
        deadline = time.monotonic() + 120
        while True:
            assert superlink.poll() is None and time.monotonic() < deadline, cluster.log("superlink")[-3000:]
            try:
                socket.create_connection(("127.0.0.1", cluster.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        for i in range(2):
            _shell(cluster, _localize(doc["ssh-keygen"][0], cluster, i))
            _client_data(root / "data" / f"client{i}.jsonl", i)
            _shell(cluster, _localize(doc["flwr supernode"][0], cluster, i))
            # client 0 is a "multi-GPU silo": its local rounds run on an accelerate launch group (1 CPU process here)
            start_supernode(cluster, f"supernode{i}", i, launcher=LAUNCHER if i == 0 else "")
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
    _shell(cluster, _localize(doc_deployment()["ssh-keygen"][0], cluster, 0, "intruder"))  # never registered
    intruder = start_supernode(cluster, "intruder", 0, key="intruder")
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


def _received_train(cluster, name: str) -> int:
    return cluster.log(name).count("Receiving: train message")


def restart_supernode(cluster, k: int, timeout: float = 240) -> int:
    """The doc's command again, until the SuperLink takes it: while it still counts the killed node as
    online (two missed heartbeats) it refuses the key (exit 305). Returns the number of refusals."""
    deadline, refused = time.monotonic() + timeout, 0
    while True:
        name = f"supernode{k}-start{len(list(cluster.root.glob(f'supernode{k}-start*.log')))}"
        node = start_supernode(cluster, name, k)
        while node.poll() is None and "SuperNode ID:" not in cluster.log(name):
            assert time.monotonic() < deadline, cluster.log(name)[-3000:]
            time.sleep(0.2)
        if node.poll() is None:
            return refused
        assert "Failed to activate SuperNode" in cluster.log(name), cluster.log(name)[-3000:]
        refused += 1
        time.sleep(1)


def test_recipes_app_as_documented_survives_a_killed_supernode_that_resumes(cluster, tmp_path_factory):
    """docs/flower.md's ``flwr run recipes/flower myfed ...`` with each node's own data; SuperNode 1 is
    SIGKILLed (with its worker: the machine is gone) in round 2 of 4, then restarted with the doc's command."""
    root = cluster.root
    if cluster.procs.get("supernode1") is None or cluster.procs["supernode1"].poll() is not None:
        cluster.procs.pop("supernode1", None)  # the kill test took it down: the doc's command brings it back
        restart_supernode(cluster, 1)
    ckpt = save_tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))
    sizes = (f"--model_name_or_path {ckpt} --output_dir {root / 'recipe_run'} --num_clients 2 --clients_per_round 2 "
             "--num_rounds 4 --local_steps 1 --max_train_samples 16 --max_eval_samples 4 "
             "--per_device_train_batch_size 4 "
             "--ga_samples 4 --ga_batch_size 4 --max_length 48 --max_new_tokens 2 --disable_tqdm true")
    merged = root / "recipe_merged"
    # round-timeout: long enough for the SuperLink to count the killed node offline and take it back
    line = _localize(doc_deployment()["flwr run"][0], cluster).replace("round-timeout=600", "round-timeout=60")
    line = line.replace("recipes/flower", str(ROOT / "recipes" / "flower"))
    line += f""" --run-config 'recipe-args="{sizes}" output-dir="{merged}"'"""
    node1 = next(n for n, proc in cluster.procs.items() if n.startswith("supernode1") and proc.poll() is None)
    sent = _received_train(cluster, node1)
    run = cluster._start("recipes_run", ["bash", "-c", "exec " + line])
    deadline = time.monotonic() + 400
    while _received_train(cluster, node1) < sent + 2:  # round 1 answered, round 2 being trained
        assert time.monotonic() < deadline and run.poll() is None, cluster.log("recipes_run")[-4000:]
        time.sleep(0.2)
    state = root / "clients" / "partition-1"
    cluster.kill(node1)
    os.killpg(int((state / "worker.pid").read_text()), signal.SIGKILL)
    # the same command (same key, same state-dir); refused while the SuperLink still counts the dead node online
    assert restart_supernode(cluster, 1) >= 1

    assert run.wait(timeout=600) == 0, cluster.log("recipes_run")[-4000:]
    log = cluster.log("recipes_run")
    # the documented policy (min-fit-fraction=0.5), in the server's log and its history
    assert "skipping round 2, client 1: no reply within round-timeout=60.0 s" in log, log[-4000:]
    history = json.loads((merged / "federated_history.json").read_text())["round_history"]
    rounds = [r for r in history if "clients" in r]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4] and all(r["clients"] == [0, 1] for r in rounds)
    assert [list(r["failed_clients"]) for r in rounds[:2]] == [[], ["1"]], rounds
    assert list(rounds[1]["client_train_loss"]) == ["0"]
    # the SuperLink takes the key back once it counts the dead node offline, which is also when round 2
    # stops waiting for it: round 3 may be sent before the new SuperNode is up, a later message reaches it
    assert all(list(r["failed_clients"]) in ([], ["1"]) for r in rounds[2:]), rounds
    # nothing lost: a second process loaded client 1 (from state-dir: round 1 applied), took the updates it
    # missed with its next message and ended on the global model
    node = json.loads((state / "node.json").read_text())
    assert node["loads"] == 2 and node["applied"] == 4, node
    final = history[-1]
    assert final["final_sync"] and final["client_base_weight_sum"] == {"0": final["server_base_weight_sum"],
                                                                       "1": final["server_base_weight_sum"]}
    assert (merged / "model.safetensors").is_file()


def test_server_that_dies_resumes_from_its_checkpoint_on_the_same_supernodes(cluster, tmp_path):
    """The ServerApp fails in round 3 of 3 after both clients trained it; ``flwr run`` again with
    ``resume-from-checkpoint = "latest"`` (docs/flower.md) goes on from round-2 on the same SuperNodes, whose
    workers and state dirs outlived the first run, and ends on the uninterrupted in-process run's weights."""
    if not any(n.startswith("supernode1") and p.poll() is None for n, p in cluster.procs.items()):
        restart_supernode(cluster, 1)  # the kill test took it down and no later test brought it back
    config = _app_config(cluster, "server_crash", **{"num-rounds": 3, "save-rounds": 1})
    crashed = _run(cluster, "server_crash", {**config, "crash-in-round": 3})
    crashed.wait(timeout=600)
    assert "injected server crash in round 3" in cluster.log("server_crash"), cluster.log("server_crash")[-3000:]
    server = Path(config["trainer-output-dir"])
    assert sorted(p.name for p in server.glob("round-*")) == ["round-1", "round-2"]
    for i in range(2):  # both clients had trained round 3 before the server died
        assert json.loads((cluster.root / "clients" / f"partition-{i}" / "node.json").read_text())["last_trained"] == 2

    resumed = _run(cluster, "server_resumed", {**config, "resume-from-checkpoint": "latest"})
    assert resumed.wait(timeout=600) == 0, cluster.log("server_resumed")[-3000:]
    history = _history(config)
    assert [r["round"] for r in history if "clients" in r] == [1, 2, 3]
    reference = build_trainer(None, {**config, "trainer-output-dir": str(tmp_path / "reference")})
    reference.train()
    got = load_file(os.path.join(config["output-dir"], "model.safetensors"))
    for name, value in reference.merged_state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
    final = history[-1]
    assert final["client_base_weight_sum"] == {"0": final["server_base_weight_sum"],
                                               "1": final["server_base_weight_sum"]}
