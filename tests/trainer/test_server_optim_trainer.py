"""Server optimizers inside FederatedTrainer: the step is applied to the global model and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from support.tiny import make_counting_dataset, make_tiny_llama
from transformers import TrainingArguments

from fedsmooth_hf import FederatedArguments, FederatedTrainer


def _trainer(out, **fed):
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=8, learning_rate=5e-3,
                             report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no")
    fed_args = FederatedArguments(**{"num_clients": 2, "num_rounds": 3, "local_steps": 1, "lora_r": 4,
                                     "lora_alpha": 8, "ga_samples": 4, "ga_batch_size": 4, "save_rounds": 1, **fed})
    return FederatedTrainer(model=make_tiny_llama(), args=args, fed_args=fed_args,
                            train_dataset=make_counting_dataset(32), eval_dataset=make_counting_dataset(16, seed=1))


def test_fedit_adam_first_round_is_the_adam_step_of_the_aggregate(tmp_path):
    trainer = _trainer(tmp_path, strategy="fedit", server_optimizer="adam", server_lr=0.05, num_rounds=1)
    previous = {n: (B.clone(), A.clone()) for n, (B, A) in trainer.strategy.global_lora().items()}
    raw = {}
    inner = trainer.strategy.aggregate

    def spy(uploads, weights):
        update = inner(uploads, weights)
        raw.update({n: (B.clone(), A.clone()) for n, (B, A) in update.global_lora.items()})
        return update

    trainer.strategy.aggregate = spy
    trainer.train()
    b1, b2, tau = 0.9, 0.99, 1e-3
    for name, pair in trainer.strategy.global_lora().items():
        for x, agg, new in zip(previous[name], raw[name], pair):
            delta = (agg - x).double()
            expected = x.double() + 0.05 * (1 - b1) * delta / (((1 - b2) * delta**2).sqrt() + tau)
            torch.testing.assert_close(new.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy,optimizer", [("fedit", "adam"), ("fedsmoothlora", "avgm"), ("flexlora", "avgm")])
def test_resume_mid_run_with_server_state_is_exact(tmp_path, strategy, optimizer):
    fed = dict(strategy=strategy, server_optimizer=optimizer)
    a = _trainer(tmp_path / "a", **fed)
    a.train()
    saved = load_file(str(tmp_path / "a" / "round-2" / "strategy.safetensors"))
    assert any(k.startswith("opt_") and saved[k].abs().sum() > 0 for k in saved), "server state is checkpointed"
    c = _trainer(tmp_path / "a", **fed)
    c.train(resume_from_checkpoint=str(tmp_path / "a" / "round-2"))
    for name, layer in a.layers.items():
        torch.testing.assert_close(c.layers[name].get_base_layer().weight, layer.get_base_layer().weight,
                                   rtol=0, atol=1e-6)
    ga, gc = a.strategy.global_lora() or {}, c.strategy.global_lora() or {}
    for name in ga:
        torch.testing.assert_close(gc[name][0], ga[name][0], rtol=0, atol=1e-6)
    for key, value in a.server_optimizer.state_dict().items():
        torch.testing.assert_close(c.server_optimizer.state_dict()[key], value, rtol=0, atol=1e-6)


def test_adaptive_server_optimizer_with_a_product_strategy_is_refused():
    with pytest.raises(ValueError, match="server_optimizer='adam' cannot be used with strategy 'fedsmoothlora'"):
        FederatedArguments(strategy="fedsmoothlora", server_optimizer="adam")
    with pytest.raises(ValueError, match="server_betas"):
        FederatedArguments(server_optimizer="adam", server_betas=[0.9])
