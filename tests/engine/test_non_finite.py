"""NaN during local training stops that client by name, and nothing non-finite ever reaches the base.

NaN is injected two ways: into the loss (a poisoned ``compute_loss``) and into the
gradient only (a backward hook on one LoRA layer; the loss stays finite).
"""

from __future__ import annotations

import pytest
import torch
from support.tiny import make_counting_dataset
from support.trainers import tiny_trainer

import fedsmooth_hf.trainer.trainer as trainer_module
from fedsmooth_hf.engine.callbacks import FederatedCallback
from fedsmooth_hf.model.merge import all_finite, merge_into_base
from fedsmooth_hf.trainer import ClientTrainingError

HOOKED_LAYER = "model.layers.0.self_attn.q_proj"


def _trainer(tmp_path, strategy="fedsmoothlora", policy="raise", num_rounds=2, num_clients=3):
    fed = {"strategy": strategy, "num_clients": num_clients, "num_rounds": num_rounds, "local_steps": 2,
           "ga_samples": 8, "on_client_failure": policy}
    return tiny_trainer(tmp_path, fed=fed, train=make_counting_dataset(16 * num_clients))


def _poison_gradient(trainer, where):
    """NaN into the gradient of one LoRA layer during local training at ``where`` = (round, client)."""
    lora_A = dict(trainer.model.named_modules())[f"base_model.model.{HOOKED_LAYER}"].lora_A["default"]

    def forward_hook(module, args, output):
        if trainer.round_context == where and module.training and output.requires_grad:
            output.register_hook(lambda grad: grad * float("nan"))

    lora_A.register_forward_hook(forward_hook)


def _poison_loss(trainer, where):
    inner = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = inner(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        return loss * float("nan") if trainer.round_context == where and model.training else loss

    trainer.compute_loss = compute_loss


def _all_base_finite(trainer) -> bool:
    return all(torch.isfinite(layer.get_base_layer().weight).all() for layer in trainer.layers.values())


def test_nan_gradient_with_finite_loss_stops_the_client_naming_the_parameter(tmp_path):
    trainer = _trainer(tmp_path, num_rounds=1)
    _poison_gradient(trainer, (1, 1))
    with pytest.raises(ClientTrainingError, match=r"^round 1, client 1: non-finite gradient of '.*q_proj\.lora_A.*' "
                                                  r"at local step 1$"):
        trainer.train()  # "at local step 1": stopped at the very step the gradient went bad, loss still finite
    assert _all_base_finite(trainer)


@pytest.mark.parametrize("strategy", ["fedsmoothlora", "fedex_lora"])
def test_skip_policy_never_merges_anything_non_finite(tmp_path, monkeypatch, strategy):
    trainer = _trainer(tmp_path, strategy, policy="skip", num_rounds=2)
    _poison_gradient(trainer, (1, 0))
    _poison_loss(trainer, (2, 2))
    merges = []

    def checked_merge(layers, merge, *args, **kwargs):
        merge_into_base(layers, merge, *args, **kwargs)
        merges.append(_all_base_finite(trainer))

    monkeypatch.setattr(trainer_module, "merge_into_base", checked_merge)
    round_ends = []

    class CheckAfterRound(FederatedCallback):
        def on_round_end(self, args, state, control, round, metrics, **kwargs):
            round_ends.append((round, _all_base_finite(trainer)))

    trainer.add_callback(CheckAfterRound())
    trainer.train()
    assert merges == [True, True]
    assert round_ends == [(1, True), (2, True)]
    failed = {r["round"]: r["failed_clients"] for r in trainer.round_history}
    assert list(failed[1]) == ["0"] and "non-finite gradient of" in failed[1]["0"]
    assert list(failed[2]) == ["2"] and "non-finite training loss" in failed[2]["2"]
    # the base really moved (merges happened), by finite amounts
    assert all(r["merge_norm"] > 0 for r in trainer.round_history)


def test_merge_checks_every_module_before_changing_any(tmp_path):
    trainer = _trainer(tmp_path, num_rounds=1)
    names = list(trainer.layers)
    before = {n: trainer.layers[n].get_base_layer().weight.clone() for n in names}
    d_out, d_in = before[names[1]].shape
    good = (torch.ones(before[names[0]].shape[0], 2), torch.ones(2, before[names[0]].shape[1]))
    bad = (torch.full((d_out, 2), float("nan")), torch.ones(2, d_in))
    with pytest.raises(ValueError, match=f"'{names[1]}' contains NaN or Inf; refusing to merge it"):
        merge_into_base(trainer.layers, {names[0]: good, names[1]: bad})
    for n in names:
        assert torch.equal(trainer.layers[n].get_base_layer().weight, before[n]), f"{n} was touched"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_agrees_with_the_elementwise_check(dtype):
    big = torch.finfo(dtype).max / 2
    # the second's sum overflows: a false alarm the exact check must overrule
    weights = [torch.randn(64, 48, dtype=dtype), torch.full((64, 48), big, dtype=dtype)]
    for value in (float("nan"), float("inf"), float("-inf")):
        w = torch.randn(64, 48, dtype=dtype)
        w[3, 5] = value
        weights.append(w)
    both = torch.randn(64, 48, dtype=dtype)
    both[0, 0], both[1, 1] = float("inf"), float("-inf")  # their sum is NaN, not a finite cancellation
    for w in [*weights, both]:
        assert all_finite(w) == bool(torch.isfinite(w).all()), (dtype, w.flatten()[:3])


def test_a_merge_that_overflows_the_base_names_the_module(tmp_path):
    trainer = _trainer(tmp_path, num_rounds=1)
    name = next(iter(trainer.layers))
    d_out, d_in = trainer.layers[name].get_base_layer().weight.shape
    huge = (torch.full((d_out, 1), 3e38), torch.full((1, d_in), 3e38))  # finite factors, a product past fp32 max
    with pytest.raises(FloatingPointError, match=f"base weight of '{name}' became non-finite"):
        merge_into_base(trainer.layers, {name: huge})
