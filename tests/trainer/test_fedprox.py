"""FedProx (prox_mu): the proximal term's gradient, its share per accumulated step, and what it does to drift."""

from __future__ import annotations

import pytest
import torch
from support.tiny import make_counting_dataset, make_tiny_llama
from transformers import TrainerCallback, TrainingArguments

from fedsmooth_hf import FederatedArguments, FederatedTrainer
from fedsmooth_hf.model.proximal import ProximalTerm


def test_gradient_of_the_term_is_mu_times_the_displacement():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)  # frozen parameters are not part of the term
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    term = ProximalTerm(model, mu=0.7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    value = term()
    value.backward()
    expected = 0.0
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None
            continue
        torch.testing.assert_close(p.grad, 0.7 * (p.detach() - start[n]))
        expected += 0.35 * ((p.detach() - start[n]) ** 2).sum()
    torch.testing.assert_close(value, expected)
    with pytest.raises(ValueError, match="mu must be > 0"):
        ProximalTerm(model, 0.0)


def _trainer(tmp_path, batch=8, accumulation=1, **fed):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, learning_rate=0.05, optim="sgd",
                             report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
                             lr_scheduler_type="constant")
    fed_args = FederatedArguments(**{"num_clients": 2, "num_rounds": 1, "local_steps": 3, "lora_r": 4,
                                     "lora_alpha": 8, "strategy": "fedit", **fed})
    return FederatedTrainer(model=make_tiny_llama(), args=args, fed_args=fed_args,
                            train_dataset=make_counting_dataset(64), eval_dataset=make_counting_dataset(16, seed=1))


def _upload(trainer):
    return trainer.train_client_round(0, 0).upload


def test_mu_zero_is_todays_run(tmp_path):
    default, off = _upload(_trainer(tmp_path / "a")), _upload(_trainer(tmp_path / "b", prox_mu=0.0))
    for name, (B, A) in default.items():
        assert torch.equal(B, off[name][0]) and torch.equal(A, off[name][1])


def test_term_counts_once_per_optimizer_step_under_gradient_accumulation(tmp_path):
    # 8 examples in one batch and 2 x 4 accumulated see the same data and must take the same steps,
    # proximal pull included (SGD: any mis-scaled term changes the second and third steps).
    whole = _upload(_trainer(tmp_path / "a", batch=8, accumulation=1, prox_mu=50.0))
    split = _upload(_trainer(tmp_path / "b", batch=4, accumulation=2, prox_mu=50.0))
    unpulled = _upload(_trainer(tmp_path / "c", batch=8, accumulation=1))
    for name in whole:
        torch.testing.assert_close(split[name][0], whole[name][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(split[name][1], whole[name][1], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(whole[n][1], unpulled[n][1], rtol=1e-4, atol=1e-6) for n in whole)


class _DriftRecorder(TrainerCallback):
    """||theta_end - theta_start|| over the parameters the client trains in its local round."""

    def __init__(self, trainer):
        self.trainer, self.start, self.drift = trainer, None, None

    def _trained(self):
        return {n: p.detach().clone() for n, p in self.trainer.model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self._trained()

    def on_train_end(self, args, state, control, **kwargs):
        end = self._trained()
        self.drift = sum(float((end[n] - p).pow(2).sum()) for n, p in self.start.items()) ** 0.5


def test_larger_mu_keeps_the_client_closer_to_its_start(tmp_path):
    drifts = []
    for mu in (0.0, 1.0, 20.0):
        trainer = _trainer(tmp_path / str(mu), prox_mu=mu, local_steps=8)
        recorder = _DriftRecorder(trainer)
        trainer.add_callback(recorder)
        _upload(trainer)
        drifts.append(recorder.drift)
    assert drifts[0] > 0
    assert drifts[0] > drifts[1] > drifts[2], drifts


def test_negative_mu_is_rejected():
    with pytest.raises(ValueError, match="prox_mu"):
        FederatedArguments(prox_mu=-0.1)
