"""Heterogeneous client ranks: aggregates against their dense definitions, uploads sized by rank."""

from __future__ import annotations

import pytest
import torch
from support.tiny import make_counting_dataset, make_tiny_llama
from transformers import TrainingArguments

from fedsmooth_hf import FederatedArguments, FederatedTrainer
from fedsmooth_hf.model.client_rank import resolve_client_ranks
from fedsmooth_hf.strategies import available_strategies, get_strategy

D_OUT, D_IN, R = 12, 10, 8
RANKS = {0: 2, 1: 4, 2: 8}
WEIGHTS = {0: 10.0, 1: 30.0, 2: 60.0}


def _uploads(gen):
    return {c: {"q": (torch.randn(D_OUT, k, generator=gen, dtype=torch.float64),
                      torch.randn(k, D_IN, generator=gen, dtype=torch.float64))} for c, k in RANKS.items()}


def _padded(B, A):
    k = B.shape[1]
    return (torch.cat([B, torch.zeros(D_OUT, R - k, dtype=B.dtype)], 1),
            torch.cat([A, torch.zeros(R - k, D_IN, dtype=A.dtype)], 0))


def _best_rank(M, k):
    U, S, Vh = torch.linalg.svd(M)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


@pytest.mark.parametrize("name", ["fedit", "ffa_lora", "fedex_lora", "flexlora", "frlora", "fedsmoothlora"])
def test_each_aggregate_equals_its_dense_definition_with_ranks_2_4_8(name):
    gen = torch.Generator().manual_seed(0)
    init = {"q": (torch.randn(D_OUT, R, generator=gen, dtype=torch.float64),
                  torch.randn(R, D_IN, generator=gen, dtype=torch.float64))}
    strategy = get_strategy(name, rank=R)
    strategy.setup(init)
    strategy.set_client_ranks(RANKS)
    uploads = _uploads(gen)
    if name == "ffa_lora":  # A is frozen at the client's share of the shared init
        uploads = {c: {"q": (up["q"][0], init["q"][1][: RANKS[c]])} for c, up in uploads.items()}
    w = {c: v / 100 for c, v in WEIGHTS.items()}
    products = sum(w[c] * uploads[c]["q"][0] @ uploads[c]["q"][1] for c in uploads)
    mean_B = sum(w[c] * _padded(*uploads[c]["q"])[0] for c in uploads)
    mean_A = sum(w[c] * _padded(*uploads[c]["q"])[1] for c in uploads)
    update = strategy.aggregate(uploads, WEIGHTS)
    merged = sum(B @ A for B, A in update.merge.values()) if update.merge else 0
    glob = update.global_lora["q"][0] @ update.global_lora["q"][1] if update.global_lora else 0
    init_product = {c: init["q"][0][:, :k] @ init["q"][1][:k] for c, k in RANKS.items()}
    expected = {
        "fedit": (0, mean_B @ mean_A),                       # zero-padded FedAvg of the factors (HetLoRA)
        "ffa_lora": (0, mean_B @ init["q"][1]),               # exact: mean(B) A == mean(B A)
        "fedex_lora": (products - mean_B @ mean_A, mean_B @ mean_A),  # the model is the exact mean
        "flexlora": (0, _best_rank(products, R)),
        "frlora": (products - sum(w[c] * init_product[c] for c in uploads), init["q"][0] @ init["q"][1]),
        "fedsmoothlora": (_best_rank(products, R), 0),
    }[name]
    torch.testing.assert_close(torch.as_tensor(merged, dtype=torch.float64) + 0 * products, expected[0] + 0 * products)
    torch.testing.assert_close(torch.as_tensor(glob, dtype=torch.float64) + 0 * products, expected[1] + 0 * products)


def test_client_starts_are_cut_to_the_client_rank():
    strategy = get_strategy("fedit", rank=R)
    init = {"q": (torch.randn(D_OUT, R), torch.randn(R, D_IN))}
    strategy.setup(init)
    strategy.set_client_ranks({0: 3})
    B, A = strategy.client_start(0).lora["q"]
    assert B.shape == (D_OUT, 3) and A.shape == (3, D_IN)
    assert torch.equal(B, init["q"][0][:, :3]) and torch.equal(A, init["q"][1][:3])
    assert strategy.client_start(1).lora["q"][0].shape == (D_OUT, R)


def test_rank_patterns_and_their_errors():
    assert resolve_client_ranks([2, 4], 5, 8) == [2, 4, 2, 4, 2]
    assert resolve_client_ranks([], 3, 8) == [8, 8, 8]
    with pytest.raises(ValueError, match=r"\[1, lora_r=8\], got \[16\]"):
        get_strategy("fedit", rank=8).set_client_ranks(resolve_client_ranks([2, 16], 4, 8))
    with pytest.raises(ValueError, match="client_ranks"):
        FederatedArguments(lora_r=4, client_ranks=[8])


@pytest.mark.parametrize("strategy", available_strategies())
def test_mixed_rank_run_uploads_by_rank_and_learns(tmp_path, strategy):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=5e-3,
                             report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no")
    fed = FederatedArguments(num_clients=2, num_rounds=2, local_steps=2, lora_r=8, lora_alpha=16, strategy=strategy,
                             client_ranks=[2, 8], ga_samples=8)
    trainer = FederatedTrainer(model=make_tiny_llama(), args=args, fed_args=fed,
                               train_dataset=make_counting_dataset(48), eval_dataset=make_counting_dataset(16, seed=1))
    trainer.train()
    assert trainer.round_history[-1]["eval_loss"] < trainer.round_history[0]["eval_loss"]
    trainer.strategy.begin_round(2)
    small, full = (trainer.train_client_round(2, c).upload for c in (0, 1))
    for name in small:
        (Bs, As), (Bf, Af) = small[name], full[name]
        assert Bs.shape[1] == As.shape[0] == 2 and Bf.shape[1] == 8
        assert torch.linalg.matrix_rank(Bs @ As) <= 2
        assert Bs.numel() + As.numel() == (Bf.numel() + Af.numel()) * 2 // 8


def test_mixed_rank_fedsmoothlora_resumes_exactly(tmp_path):
    def trainer():
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=5e-3,
                                 report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no")
        fed = FederatedArguments(num_clients=3, clients_per_round=2, num_rounds=3, local_steps=1, lora_r=4,
                                 lora_alpha=8, client_ranks=[1, 2, 4], ga_samples=8, save_rounds=1)
        return FederatedTrainer(model=make_tiny_llama(), args=args, fed_args=fed,
                                train_dataset=make_counting_dataset(48), eval_dataset=make_counting_dataset(8, seed=1))

    a = trainer()
    a.train()
    c = trainer()
    c.train(resume_from_checkpoint=str(tmp_path / "round-1"))
    for name, layer in a.layers.items():
        torch.testing.assert_close(c.layers[name].get_base_layer().weight, layer.get_base_layer().weight,
                                   rtol=0, atol=1e-6)
