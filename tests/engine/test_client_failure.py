"""on_client_failure: a client that raises or uploads non-finite factors, under "raise" and "skip".

Clients hold 16, 24, 32 and 40 examples, so a wrong reweighting (all four sizes,
or equal weights) gives a visibly different aggregate.
"""

from __future__ import annotations

import logging

import pytest
import torch
from support.tiny import make_counting_dataset
from support.trainers import tiny_trainer
from transformers import TrainerCallback

from fedsmooth_hf.model.adapter import lora_scaling
from fedsmooth_hf.trainer import ClientTrainingError

SIZES = (16, 24, 32, 40)
FAILING = 1
RANK = 4


def _trainer(tmp_path, strategy="fedsmoothlora", policy="raise", num_rounds=1):
    data = make_counting_dataset(sum(SIZES))
    bounds = [sum(SIZES[:i]) for i in range(len(SIZES) + 1)]
    clients = [data.select(range(bounds[i], bounds[i + 1])) for i in range(len(SIZES))]
    fed = {"strategy": strategy, "num_clients": len(SIZES), "num_rounds": num_rounds, "local_steps": 2, "lora_r": RANK,
           "on_client_failure": policy}
    return tiny_trainer(tmp_path, fed=fed, client_datasets=clients)


class _Fail(TrainerCallback):
    """Makes ``clients`` fail in round 1: an exception mid-training, or NaN factors at its end (finite loss)."""

    def __init__(self, trainer, kind, clients=(FAILING,)):
        self.trainer, self.kind, self.clients = trainer, kind, set(clients)

    def _targeted(self):
        ctx = self.trainer.round_context
        return ctx is not None and ctx[0] == 1 and ctx[1] in self.clients

    def on_step_end(self, args, state, control, **kwargs):
        if self.kind == "exception" and self._targeted():
            raise RuntimeError("disk on fire")

    def on_train_end(self, args, state, control, **kwargs):
        if self.kind == "non_finite_upload" and self._targeted():
            layer = next(iter(self.trainer.layers.values()))
            with torch.no_grad():
                layer.lora_B["default"].weight[0, 0] = float("nan")


REASONS = {"exception": "RuntimeError('disk on fire')", "non_finite_upload": "non-finite LoRA factors in"}


class _Spy:
    """Records what the server aggregated: uploads, raw weights and the update."""

    def __init__(self, strategy):
        self.calls = []
        inner = strategy.aggregate

        def aggregate(uploads, weights):
            update = inner(uploads, weights)
            self.calls.append({
                "uploads": {c: {n: (B.clone(), A.clone()) for n, (B, A) in up.items()} for c, up in uploads.items()},
                "weights": dict(weights),
                "merge": {n: (B.clone(), A.clone()) for n, (B, A) in update.merge.items()},
                "global": None if update.global_lora is None
                else {n: (B.clone(), A.clone()) for n, (B, A) in update.global_lora.items()},
            })
            return update

        strategy.aggregate = aggregate


def _base(trainer):
    return {n: layer.get_base_layer().weight.detach().clone() for n, layer in trainer.layers.items()}


def _best_rank_r(D, r):
    U, S, Vh = torch.linalg.svd(D)
    return (U[:, :r] * S[:r]) @ Vh[:r]


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory):
    """The same round with no failure, per strategy: the survivors' uploads must match it exactly."""
    runs = {}
    for strategy in ("fedsmoothlora", "fedit"):
        trainer = _trainer(tmp_path_factory.mktemp(strategy), strategy)
        spy = _Spy(trainer.strategy)
        trainer.train()
        runs[strategy] = spy.calls[0]
    return runs


@pytest.mark.parametrize("kind", ["exception", "non_finite_upload"])
def test_raise_policy_stops_naming_round_and_client(tmp_path, kind):
    trainer = _trainer(tmp_path)
    trainer.add_callback(_Fail(trainer, kind))
    before = _base(trainer)
    with pytest.raises(ClientTrainingError) as info:
        trainer.train()
    err = info.value
    assert str(err).startswith(f"round 1, client {FAILING}: ") and REASONS[kind] in str(err)
    assert (err.round_number, err.client) == (1, FAILING)
    if kind == "exception":
        assert isinstance(err.__cause__, RuntimeError)
    # nothing of the failed round reached the base or the disk
    assert all(torch.equal(before[n], w) for n, w in _base(trainer).items())
    assert not any(tmp_path.glob("round-*"))


@pytest.mark.parametrize("strategy,kind", [("fedsmoothlora", "exception"), ("fedsmoothlora", "non_finite_upload"),
                                           ("fedit", "exception")])
def test_skip_policy_aggregates_survivors_with_renormalized_weights(tmp_path, caplog, clean_runs, strategy, kind):
    trainer = _trainer(tmp_path, strategy, policy="skip")
    trainer.add_callback(_Fail(trainer, kind))
    spy = _Spy(trainer.strategy)
    before = _base(trainer)
    with caplog.at_level(logging.WARNING, logger="fedsmooth_hf.trainer"):
        trainer.train()

    (record,) = trainer.round_history  # no eval_dataset: no round-0 entry
    assert list(record["failed_clients"]) == [str(FAILING)] and REASONS[kind] in record["failed_clients"][str(FAILING)]
    assert any(f"round 1, client {FAILING}" in m and "skipping" in m for m in caplog.messages)
    survivors = [c for c in range(len(SIZES)) if c != FAILING]
    call, clean = spy.calls[0], clean_runs[strategy]
    assert sorted(call["uploads"]) == survivors
    assert call["weights"] == {c: float(SIZES[c]) for c in survivors}
    # the survivors trained exactly as if nobody had failed (the failure did not leak into them)
    for c in survivors:
        for name, (B, A) in clean["uploads"][c].items():
            assert torch.equal(call["uploads"][c][name][0], B) and torch.equal(call["uploads"][c][name][1], A)
    # round train loss: weighted over the survivors only
    losses = record["client_train_loss"]
    assert sorted(losses) == [str(c) for c in survivors]
    expected_loss = sum(SIZES[c] * losses[str(c)] for c in survivors) / sum(SIZES[c] for c in survivors)
    assert record["train_loss"] == pytest.approx(expected_loss, rel=1e-12)

    total = sum(SIZES[c] for c in survivors)
    for name, layer in trainer.layers.items():
        ups = {c: tuple(t.double() for t in call["uploads"][c][name]) for c in survivors}
        if strategy == "fedsmoothlora":
            # aggregate = SVD_r(sum over survivors of n_c / N_survivors * B_c A_c), checked densely in float64
            D = sum(SIZES[c] / total * ups[c][0] @ ups[c][1] for c in survivors)
            B, A = call["merge"][name]
            torch.testing.assert_close((B.double() @ A.double()), _best_rank_r(D, RANK), rtol=1e-5, atol=1e-7)
            # not vacuous: weighting over all four clients would have given a different aggregate
            everyone = sum(SIZES[c] / sum(SIZES) * up[name][0].double() @ up[name][1].double()
                           for c, up in clean["uploads"].items())
            assert torch.linalg.norm(_best_rank_r(everyone, RANK) - D) > 1e-3 * torch.linalg.norm(D)
            expected_base = before[name] + lora_scaling(layer) * (B @ A)
            torch.testing.assert_close(layer.get_base_layer().weight, expected_base, rtol=1e-5, atol=1e-7)
        else:
            # FedIT: the new global adapter is the survivors' renormalized factor mean; nothing merged
            B_bar = sum(SIZES[c] / total * ups[c][0] for c in survivors)
            A_bar = sum(SIZES[c] / total * ups[c][1] for c in survivors)
            B, A = call["global"][name]
            torch.testing.assert_close(B.double(), B_bar, rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(A.double(), A_bar, rtol=1e-6, atol=1e-8)
            assert torch.equal(layer.get_base_layer().weight, before[name])


def test_every_client_failing_is_an_error_naming_the_round(tmp_path):
    trainer = _trainer(tmp_path, "fedit", policy="skip")
    trainer.add_callback(_Fail(trainer, "exception", clients=range(len(SIZES))))
    before = _base(trainer)
    with pytest.raises(ClientTrainingError, match=r"^round 1: every sampled client failed") as info:
        trainer.train()
    assert info.value.client is None
    assert all(f"{c}: " in str(info.value) for c in range(len(SIZES)))
    assert all(torch.equal(before[n], w) for n, w in _base(trainer).items())
    assert not any(tmp_path.glob("round-*"))
