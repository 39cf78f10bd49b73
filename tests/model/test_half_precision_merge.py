"""bf16 bases: merged updates are kept exactly (fp32 low-rank residual), survive a resume, and export."""

import torch
from peft import LoraConfig, get_peft_model
from support.tiny import make_counting_dataset, make_tiny_llama
from support.trainers import tiny_trainer

from fedsmooth_hf.model.adapter import lora_layers, lora_scaling
from fedsmooth_hf.model.merge import base_residual, dense_base_weight, keeps_residual, merge_into_base


def _retained(change, update):
    return float((change * update).sum() / (update * update).sum())


def test_small_updates_into_a_bf16_base_are_kept_exactly():
    model = get_peft_model(make_tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"]))
    layers = lora_layers(model)
    name, layer = next(iter(layers.items()))
    assert keeps_residual(layer.get_base_layer())
    W0 = dense_base_weight(layer).clone()
    raw0 = layer.get_base_layer().weight.detach().clone()
    s = lora_scaling(layer)
    gen = torch.Generator().manual_seed(0)
    total = torch.zeros_like(W0)
    naive_w = W0.to(torch.bfloat16)  # what in-place bf16 adds, round by round, would hold
    for _ in range(10):  # ten rounds of updates of relative size 1e-3
        B, A = torch.randn(W0.shape[0], 4, generator=gen), torch.randn(4, W0.shape[1], generator=gen)
        B *= 1e-3 * float(torch.linalg.norm(W0)) / float(torch.linalg.norm(s * B @ A))
        merge_into_base(layers, {name: (B, A)})
        total += s * B @ A
        naive_w = (naive_w.float() + s * B @ A).to(torch.bfloat16)
    change = dense_base_weight(layer) - W0
    # exact up to fp32 rounding of W0 + update (W0 ~ 100x larger than the update)
    torch.testing.assert_close(change, total, rtol=0, atol=1e-6 * float(W0.abs().max()))
    assert torch.equal(layer.get_base_layer().weight, raw0), "the bf16 weight itself is never rounded"
    assert base_residual(layer).B.shape[1] == 40
    assert _retained(change, total) > 0.9999 > _retained(naive_w.float() - W0, total) + 0.05


def _trainer(out, **fed):
    fa = {"strategy": "fedsmoothlora", "num_clients": 3, "num_rounds": 2, "local_steps": 2, "ga_samples": 8,
          "save_rounds": 1, **fed}
    return tiny_trainer(out, fed=fa, model=make_tiny_llama().to(torch.bfloat16), train=make_counting_dataset(72),
                        eval_dataset=make_counting_dataset(16, seed=1), seed=3)


def test_bf16_run_resumes_with_its_residual_and_exports_it(tmp_path):
    a = _trainer(tmp_path / "a")
    a.train()
    effective = {n: dense_base_weight(layer) for n, layer in a.layers.items()}
    assert all(base_residual(layer) is not None for layer in a.layers.values())
    b = _trainer(tmp_path / "a")
    b.train(resume_from_checkpoint=str(tmp_path / "a" / "round-1"))
    for n, layer in b.layers.items():
        torch.testing.assert_close(dense_base_weight(layer), effective[n], rtol=0, atol=1e-6)
    merged = a.merged_state_dict(dtype=torch.float32)
    name = next(iter(a.layers))
    key = name.removeprefix("base_model.model.") + ".weight"
    torch.testing.assert_close(merged[key], effective[name], rtol=0, atol=1e-6)
