"""One round loop for every way a federation runs: same records, same events, same steering."""

import math
import os
import sys
from pathlib import Path

import pytest
from flower_task import build_trainer
from support.tiny import make_tiny_llama

from fedsmooth_hf.engine.callbacks import FederatedCallback

TESTS = Path(__file__).resolve().parents[1]
#: what only a Flower round records: the bytes on the wire
WIRE_KEYS = {"upload_bytes", "upload_lora_bytes", "download_bytes", "model_bytes"}


class StopAfter(FederatedCallback):
    """Ends the federation after round ``last``; records every round event it sees."""

    def __init__(self, last):
        self.last = last
        self.events = []

    def on_round_begin(self, args, state, control, round, clients, **kwargs):
        self.events.append(("round_begin", round, tuple(clients)))

    def on_client_begin(self, args, state, control, round, client, **kwargs):
        self.events.append(("client_begin", round, client))

    def on_client_end(self, args, state, control, round, client, metrics, **kwargs):
        self.events.append(("client_end", round, client))

    def on_round_end(self, args, state, control, round, metrics, **kwargs):
        self.events.append(("round_end", round))
        if round == self.last:
            control.should_training_stop = True
        return control


def _assert_same_records(got, want):
    assert [r["round"] for r in got] == [r["round"] for r in want]
    for g, w in zip(got, want):
        assert set(g) - WIRE_KEYS == set(w), (sorted(g), sorted(w))
        for key, value in w.items():
            if key.endswith("_s"):  # timings
                continue
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, abs=1e-6), key
            elif isinstance(value, dict):
                assert g[key].keys() == value.keys(), key
                for c in value:
                    assert g[key][c] == pytest.approx(value[c], abs=1e-6), (key, c)
            else:
                assert g[key] == value, key


def test_callback_stops_an_in_process_federation_after_round_2(tmp_path, make_trainer):
    stop = StopAfter(2)
    trainer = make_trainer(tmp_path / "run", fed={"strategy": "fedit", "local_steps": 1})
    trainer.add_callback(stop)
    out = trainer.train()
    assert [r["round"] for r in trainer.round_history] == [1, 2]
    assert out.metrics["rounds"] == 2
    assert [e for e in stop.events if e[0] == "round_end"] == [("round_end", 1), ("round_end", 2)]
    # the schedule (FederatedFlowCallback) checkpoints after the last round only: round 3 never ran
    assert not (tmp_path / "run" / "round-3").exists()


def test_a_callback_can_ask_for_a_checkpoint(tmp_path, make_trainer):
    class SaveRound1(FederatedCallback):
        def on_round_begin(self, args, state, control, round, clients, **kwargs):
            control.should_save = control.should_save or round == 1

    trainer = make_trainer(tmp_path / "run", fed={"strategy": "fedit", "local_steps": 1, "num_rounds": 2})
    trainer.add_callback(SaveRound1())
    trainer.train()
    assert (tmp_path / "run" / "round-1").is_dir() and (tmp_path / "run" / "round-2").is_dir()


def _saved_model(tmp_path):
    path = tmp_path / "tiny_llama"
    if not path.is_dir():
        make_tiny_llama().save_pretrained(path)
    return str(path)


def test_flower_simulation_has_the_in_process_rounds_and_stops_alike(tmp_path, monkeypatch):
    from flwr.simulation import run_simulation

    from fedsmooth_hf.flower import make_client_app, make_server_app

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent), *sys.path]))
    config = {"model-path": _saved_model(tmp_path), "strategy": "fedsmoothlora", "trainer-output-dir":
              str(tmp_path / "server"), "client-state-dir": str(tmp_path / "clients"),
              "output-dir": str(tmp_path / "merged")}
    server_stop = StopAfter(2)

    def build_server(partition_id, cfg):
        trainer = build_trainer(partition_id, cfg)
        trainer.add_callback(server_stop)
        return trainer

    finished = {}
    run_simulation(make_server_app(build_server, config, on_finish=lambda t: finished.update(trainer=t)),
                   make_client_app(build_trainer, config), num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 2}})
    federated = finished["trainer"]

    local_stop = StopAfter(2)
    reference = build_trainer(None, {**config, "trainer-output-dir": str(tmp_path / "reference")})
    reference.add_callback(local_stop)
    reference.train()

    rounds = [r for r in federated.round_history if not r.get("final_sync")]
    assert [r["round"] for r in rounds] == [1, 2]  # num-rounds is 3: the callback stopped both
    assert federated.round_history[-1]["final_sync"] and federated.round_history[-1]["round"] == 2
    _assert_same_records(rounds, reference.round_history)
    assert "zeta" in rounds[0] and "rm_kept_median" in rounds[1] and math.isfinite(rounds[1]["merge_norm"])
    # the same round events, in-process clients one by one, Flower clients all at once
    assert sorted(server_stop.events) == sorted(local_stop.events)
    # the same round-level log lines
    logged = [{k: v for k, v in e.items() if k in ("round", "train_loss", "merge_norm")}
              for e in federated.state.log_history if "merge_norm" in e]
    want = [{k: v for k, v in e.items() if k in ("round", "train_loss", "merge_norm")}
            for e in reference.state.log_history if "merge_norm" in e]
    assert [e["round"] for e in logged] == [e["round"] for e in want] == [1, 2]
    for g, w in zip(logged, want):
        assert g["train_loss"] == pytest.approx(w["train_loss"], abs=1e-6)
        assert g["merge_norm"] == pytest.approx(w["merge_norm"], abs=1e-6)
