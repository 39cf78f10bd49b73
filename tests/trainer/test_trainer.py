"""FederatedTrainer end to end on a tiny Llama and a learnable counting task."""

import math
import re
from pathlib import Path

import pytest
import torch
from support.tiny import make_counting_dataset, make_tiny_llama
from support.trainers import federated_args as _fed
from support.trainers import tiny_trainer, training_args

from fedsmooth_hf import FederatedArguments, FederatedTrainer
from fedsmooth_hf.engine import local_round
from fedsmooth_hf.engine.callbacks import FederatedCallback
from fedsmooth_hf.model.adapter import lora_scaling
from fedsmooth_hf.strategies import available_strategies


def _args(tmp_path, **kw):
    return training_args(tmp_path, **{"logging_steps": 1, **kw})


def _trainer(tmp_path, fed=None, model=None, train=None, **kw):
    return tiny_trainer(tmp_path, fed=fed, model=model, train=train, eval_dataset=make_counting_dataset(32, seed=1),
                        **{"logging_steps": 1, **kw})


def _base_weights(trainer):
    return {n: l.get_base_layer().weight.detach().clone() for n, l in trainer.layers.items()}


class _RecordMerges:
    """Spy on the strategy's aggregate to know exactly what the server merged."""

    def __init__(self, strategy):
        self.updates = []
        inner = strategy.aggregate

        def aggregate(uploads, weights):
            update = inner(uploads, weights)
            self.updates.append({n: (B.clone(), A.clone()) for n, (B, A) in update.merge.items()})
            return update

        strategy.aggregate = aggregate


@pytest.mark.parametrize("strategy", available_strategies())
def test_each_strategy_learns_and_base_moves_by_exactly_the_merges(tmp_path, strategy):
    trainer = _trainer(tmp_path, fed=_fed(strategy=strategy))
    before = trainer.evaluate()["eval_loss"]
    W0 = _base_weights(trainer)
    spy = _RecordMerges(trainer.strategy)
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before, f"{strategy}: eval loss {before:.4f} -> {after:.4f}"
    assert len(spy.updates) == 3
    W1 = _base_weights(trainer)
    for name, layer in trainer.layers.items():
        s = lora_scaling(layer)
        expected = W0[name].clone()
        for update in spy.updates:
            if name in update:
                B, A = update[name]
                expected += s * B @ A
        torch.testing.assert_close(W1[name], expected, rtol=1e-5, atol=1e-6)
    merges = sum(1 for u in spy.updates if u)
    if strategy in ("fedit", "ffa_lora", "flexlora"):
        assert merges == 0 and all(torch.equal(W0[n], W1[n]) for n in W0)
    else:
        assert merges == 3 and any(not torch.equal(W0[n], W1[n]) for n in W0)
    # history: round 0 (before training) + 3 rounds, every entry with the round number
    assert [r["round"] for r in trainer.round_history] == [0, 1, 2, 3]
    assert all("eval_loss" in r for r in trainer.round_history)
    # metrics logged through the Trainer carry the round (and client inside local rounds)
    logged = trainer.state.log_history
    assert any(e.get("client") == 3 and e.get("round") == 2 and "loss" in e for e in logged)


def test_same_seed_same_result_and_resume_is_exact(tmp_path):
    fed = dict(strategy="fedsmoothlora", num_rounds=3, save_rounds=1, clients_per_round=3, zeta_mode="cosine")
    a = _trainer(tmp_path / "a", fed=_fed(**fed))
    a.train()
    b = _trainer(tmp_path / "b", fed=_fed(**fed))
    b.train()
    Wa, Wb = _base_weights(a), _base_weights(b)
    for n in Wa:
        assert torch.equal(Wa[n], Wb[n]), "same seed must give identical weights"

    assert sorted(p.name for p in (tmp_path / "a").glob("round-*")) == ["round-1", "round-2", "round-3"]
    # a fresh process-like trainer resumed after round 1 ends where the uninterrupted run ended
    c = _trainer(tmp_path / "a", fed=_fed(**fed))  # the same pretrained model, reloaded
    c.train(resume_from_checkpoint=str(tmp_path / "a" / "round-1"))
    Wc = _base_weights(c)
    for n in Wa:
        torch.testing.assert_close(Wc[n], Wa[n], rtol=0, atol=1e-6)
    assert [r["round"] for r in c.round_history] == [r["round"] for r in a.round_history]
    assert c.round_history[-1]["eval_loss"] == pytest.approx(a.round_history[-1]["eval_loss"], abs=1e-6)


def test_partial_participation_with_continuity_resumes_exactly(tmp_path):
    """Stale clients under the continuity policy: the missed aggregates are checkpointed and resume exactly."""
    from safetensors.torch import load_file

    fed = dict(strategy="fedsmoothlora", num_rounds=4, save_rounds=1, clients_per_round=2, local_steps=2,
               stale_round_matching="continuity")
    a = _trainer(tmp_path / "a", fed=_fed(**fed))
    a.train()
    saved = load_file(str(tmp_path / "a" / "round-2" / "strategy.safetensors"))
    assert any(k.startswith("merged") for k in saved) and any("@" in k for k in saved)
    c = _trainer(tmp_path / "a", fed=_fed(**fed))
    c.train(resume_from_checkpoint=str(tmp_path / "a" / "round-2"))
    Wa, Wc = _base_weights(a), _base_weights(c)
    for n in Wa:
        torch.testing.assert_close(Wc[n], Wa[n], rtol=0, atol=1e-6)


def test_rounds_see_different_data_and_clients_are_sampled(tmp_path):
    seen = []

    class Spy(FederatedCallback):
        def on_round_begin(self, args, state, control, round, clients, **kw):
            seen.append(("round", round, tuple(clients)))

        def on_client_begin(self, args, state, control, round, client, **kw):
            seen.append(("client", round, client))

        def on_client_end(self, args, state, control, round, client, metrics, **kw):
            seen.append(("end", round, client, metrics["train_loss"]))

        def on_round_end(self, args, state, control, round, metrics, **kw):
            # round 0 is the evaluation before training: eval metrics, no train_loss
            seen.append(("round_end", round, metrics.get("train_loss", metrics.get("eval_loss"))))

    trainer = _trainer(tmp_path, fed=_fed(strategy="fedit", num_clients=6, clients_per_round=2, num_rounds=3))
    trainer.add_callback(Spy())
    trainer.train()
    rounds = [e for e in seen if e[0] == "round"]
    assert [r[1] for r in rounds] == [1, 2, 3]
    assert all(len(r[2]) == 2 for r in rounds)
    assert len({r[2] for r in rounds}) > 1, "seeded sampling should not pick the same pair every round"
    assert sum(1 for e in seen if e[0] == "end") == 6
    ends = [e for e in seen if e[0] == "round_end"]
    assert [e[1] for e in ends] == [0, 1, 2, 3] and all(math.isfinite(e[2]) for e in ends)


def test_client_state_memory_is_factors_only(tmp_path):
    fed = _fed(strategy="fedsmoothlora", num_clients=32, num_rounds=1, local_steps=1, ga_samples=4, ga_batch_size=4)
    trainer = _trainer(tmp_path, fed=fed, train=make_counting_dataset(32 * 5), per_device_train_batch_size=4)
    trainer.train()
    r = trainer.lora_rank
    per_client = sum(r * (l.in_features + l.out_features) for l in trainer.layers.values()) * 4  # fp32
    assert trainer.strategy.client_state_bytes() == 32 * per_client


def test_no_deepcopy_of_models_anywhere():
    root = Path(__file__).resolve().parents[2] / "fedsmooth_hf"
    offenders = [str(p) for p in root.rglob("*.py") if re.search(r"deepcopy", p.read_text())]
    assert offenders == []


# ---------------------------------------------------------------- bad input
def test_bad_input_errors(tmp_path):
    import datasets

    with pytest.raises(ValueError, match="clients_per_round"):
        FederatedArguments(num_clients=3, clients_per_round=4)
    with pytest.raises(ValueError, match="unknown strategy 'fedavg'; valid strategies are"):
        FederatedArguments(strategy="fedavg")
    with pytest.raises(ValueError, match="partition_column"):
        FederatedArguments(partition="column")
    empty = make_counting_dataset(8).select([])
    with pytest.raises(ValueError, match="client 1 has no data"):
        FederatedTrainer(model=make_tiny_llama(), args=_args(tmp_path), fed_args=_fed(num_clients=2),
                         client_datasets=[make_counting_dataset(20), empty])
    with pytest.raises(ValueError, match=r"target_modules=\['nonexistent'\] match no Linear layer"):
        _trainer(tmp_path, fed=_fed(target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="lora_r=20 is too large for layer"):
        _trainer(tmp_path, fed=_fed(lora_r=20))
    assert isinstance(empty, datasets.Dataset)


def test_nan_loss_stops_with_round_and_client_and_keeps_last_checkpoint(tmp_path):
    from fedsmooth_hf.trainer import ClientTrainingError

    trainer = _trainer(tmp_path, fed=_fed(strategy="fedit", num_rounds=3, save_rounds=1))
    calls = {"n": 0}
    inner = trainer.compute_loss

    def poisoned(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = inner(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        calls["n"] += 1
        if trainer.state.global_step >= 0 and trainer.round_context == (2, 1):
            return loss * float("nan")
        return loss

    trainer.compute_loss = poisoned
    with pytest.raises(ClientTrainingError, match=r"round 2, client 1: non-finite training loss"):
        trainer.train()
    assert (tmp_path / "round-1").is_dir() and not (tmp_path / "round-2").exists()
    for layer in trainer.layers.values():
        assert torch.isfinite(layer.get_base_layer().weight).all()


def test_skip_policy_drops_the_failing_client(tmp_path):
    trainer = _trainer(tmp_path, fed=_fed(strategy="fedsmoothlora", num_rounds=2, on_client_failure="skip"))
    inner = trainer.compute_loss

    def poisoned(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = inner(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        return loss * float("nan") if trainer.round_context == (1, 2) and model.training else loss

    trainer.compute_loss = poisoned
    trainer.train()
    first = trainer.round_history[1]
    assert first["round"] == 1 and list(first["failed_clients"]) == ["2"]
    assert "2" not in first["client_train_loss"] and len(first["client_train_loss"]) == 3
    for layer in trainer.layers.values():
        assert torch.isfinite(layer.get_base_layer().weight).all()


def test_ga_samples_larger_than_a_client_uses_all_its_examples(tmp_path, caplog, monkeypatch):
    sizes = [12, 40]
    clients = [make_counting_dataset(n, seed=i) for i, n in enumerate(sizes)]
    fed = _fed(strategy="fedsmoothlora", num_clients=2, num_rounds=1, local_steps=1, ga_samples=32, ga_batch_size=8)
    with caplog.at_level("WARNING", logger="fedsmooth_hf"):
        trainer = FederatedTrainer(model=make_tiny_llama(), args=_args(tmp_path), fed_args=fed, client_datasets=clients)
    assert "ga_samples=32 exceeds the size of 1 client(s)" in caplog.text and "client 0: 12" in caplog.text
    seen = {}
    inner = local_round.calibration_batches

    def counting(trainer, client, seed):
        for batch in inner(trainer, client, seed):
            seen[client] = seen.get(client, 0) + batch["input_ids"].shape[0]
            yield batch

    monkeypatch.setattr(local_round, "calibration_batches", counting)
    trainer.train()
    assert seen == {0: 12, 1: 32}
    assert math.isfinite(trainer.round_history[-1]["train_loss"])


@pytest.mark.parametrize("split, expected", [
    ({"partition": "iid"}, "constant"),
    ({"partition": "dirichlet", "partition_column": "label"}, "cosine"),
    ({"partition": "column", "partition_column": "label"}, "cosine"),
    ("client_datasets", "cosine"),
])
def test_zeta_mode_auto_follows_the_split(tmp_path, split, expected):
    train = make_counting_dataset(64)
    train = train.add_column("label", [i % 4 for i in range(len(train))])
    if split == "client_datasets":
        trainer = FederatedTrainer(model=make_tiny_llama(), args=_args(tmp_path), fed_args=_fed(num_clients=2),
                                   client_datasets=[train.select(range(32)), train.select(range(32, 64))])
    else:
        trainer = _trainer(tmp_path, fed=_fed(**split), train=train)
    assert trainer.strategy.config.zeta_mode == "auto"
    assert trainer.strategy.zeta_mode == expected
    assert trainer.strategy.describe()["zeta_mode"] == expected
