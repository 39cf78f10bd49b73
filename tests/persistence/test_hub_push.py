"""Pushing to the Hub, against a local fake of the Hub's HTTP API (tests/support/fake_hub.py): no network, no mocks."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from support.fake_hub import fake_hub
from support.tiny import make_counting_dataset, make_tiny_llama
from transformers import LlamaForCausalLM, TrainingArguments

from fedsmooth_hf import FederatedArguments, FederatedTrainer
from fedsmooth_hf.persistence.hub import model_card, push_folder_to_hub

# a GET the client may make on its own (agent detection for its user agent); the fake answers 404
_TOLERATED_UNHANDLED = {("GET", "/api/agent-harnesses")}


@pytest.fixture
def hub():
    from huggingface_hub import constants

    before = (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET, os.environ.get("HF_ENDPOINT"))
    with fake_hub() as server:
        yield server
    # the client is pointed back where it was (the suite runs with HF_HUB_OFFLINE=1)
    after = (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET, os.environ.get("HF_ENDPOINT"))
    assert after == before


def _write(folder, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_push_folder_uploads_every_file_byte_identical(tmp_path, hub):
    files = {
        "README.md": b"---\nlicense: mit\ntags:\n- federated-learning\n---\n\n# A test model\n",
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 32}).encode(),
        "model.safetensors": os.urandom(1_500_000),
        "extra/notes.txt": b"nested paths keep their folders\n",
    }
    _write(tmp_path, files)

    url = push_folder_to_hub(tmp_path, "user/fed-model", token="hf_dummy", private=True, commit_message="m")

    repo = hub.repos["user/fed-model"]
    assert repo["private"] is True
    assert repo["commits"] == ["m"]
    assert repo["files"].keys() == files.keys()
    for rel, data in files.items():
        assert repo["files"][rel] == data, rel
    assert url.startswith(f"{hub.url}/user/fed-model/commit/")
    # the weights took the LFS path (batch + PUT by sha256), the small text files went inline
    oid = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert ("PUT", f"/_fake_lfs/upload/user/fed-model/{oid}") in hub.requests
    assert set(hub.lfs_objects["user/fed-model"]) == {oid}
    assert hub.tokens and set(hub.tokens) == {"hf_dummy"}
    assert set(hub.unhandled) <= _TOLERATED_UNHANDLED

    # a second push to the existing repo: exist_ok path, a new commit, the stored LFS object is reused
    _write(tmp_path, {"config.json": b'{"model_type": "llama", "hidden_size": 64}'})
    puts = sum(method == "PUT" for method, _ in hub.requests)
    push_folder_to_hub(tmp_path, "user/fed-model", token="hf_dummy", private=True, commit_message="m2")
    assert repo["commits"] == ["m", "m2"] and repo["private"] is True
    assert repo["files"]["config.json"] == b'{"model_type": "llama", "hidden_size": 64}'
    assert sum(method == "PUT" for method, _ in hub.requests) == puts


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory):
    """One federated round of a tiny Llama, then ``trainer.push_to_hub()`` to a fake hub (stopped on return)."""
    out = tmp_path_factory.mktemp("fed") / "out"
    with fake_hub() as server:
        trainer = FederatedTrainer(
            model=make_tiny_llama(),
            args=TrainingArguments(output_dir=str(out), hub_model_id="user/tiny-fed", hub_token="hf_dummy",
                                   report_to="none", use_cpu=True, disable_tqdm=True, per_device_train_batch_size=4),
            fed_args=FederatedArguments(strategy="fedit", num_clients=2, num_rounds=1, local_steps=1, lora_r=2,
                                        lora_alpha=4),
            train_dataset=make_counting_dataset(16),
        )
        trainer.train()
        url = trainer.push_to_hub()
    return server, out, url


def test_trainer_push_to_hub_round_trips_the_merged_model(tmp_path, pushed_run):
    hub, out, url = pushed_run
    assert url.startswith(f"{hub.url}/user/tiny-fed/commit/")
    repo = hub.repos["user/tiny-fed"]
    assert repo["private"] is False  # hub_private_repo left unset
    assert repo["commits"] == ["End of federated training"]
    files = repo["files"]
    for name in ("model.safetensors", "config.json", "README.md", "federated_history.json"):
        assert name in files, sorted(files)
        assert files[name] == (out / name).read_bytes(), name
    card = files["README.md"].decode().lower()
    assert "fedit" in card and "federated" in card
    assert json.loads(files["federated_history.json"])["fed_args"]["strategy"] == "fedit"
    assert set(hub.tokens) == {"hf_dummy"}
    assert set(hub.unhandled) <= _TOLERATED_UNHANDLED

    received = tmp_path / "received"
    _write(received, files)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        expected = LlamaForCausalLM.from_pretrained(out).eval()(ids).logits
        got = LlamaForCausalLM.from_pretrained(received).eval()(ids).logits
    assert torch.allclose(got, expected)


def test_trainer_push_to_hub_leaves_federated_checkpoints_out(pushed_run):
    hub, _, _ = pushed_run
    uploaded = hub.repos["user/tiny-fed"]["files"]
    assert not [p for p in uploaded if p.startswith(("round-", ".round-"))], sorted(uploaded)


def test_push_of_a_model_trained_from_a_local_checkpoint(tmp_path, hub):
    ckpt = tmp_path / "ckpt"
    model = make_tiny_llama()
    model.save_pretrained(ckpt)
    model = LlamaForCausalLM.from_pretrained(ckpt)  # _name_or_path is now the local directory
    out = tmp_path / "out"
    card = model_card(model.config._name_or_path, {"strategy": "fedit"}, {"strategy": "fedit"}, [])
    _write(out, {"README.md": card.encode(), "config.json": b"{}"})
    push_folder_to_hub(out, "user/from-local", token="hf_dummy")
    assert hub.repos["user/from-local"]["commits"]
