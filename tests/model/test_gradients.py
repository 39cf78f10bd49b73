"""Hooked base-weight gradients of PEFT models (Llama and ViT) against autograd's, and clear errors."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedsmooth_hf.model.adapter import lora_layers
from fedsmooth_hf.model.gradients import estimate_weight_gradients


def _llama_batches(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (2, 7), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _vit_batches(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        {"pixel_values": torch.randn(3, 1, 8, 8, generator=gen), "labels": torch.randint(0, 4, (3,), generator=gen)}
        for _ in range(n)
    ]


def _autograd_reference(model, layers, batches):
    bases = {n: layer.get_base_layer().weight for n, layer in layers.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in bases.values():
        w.requires_grad_(True)
        w.grad = None
    for b in batches:
        model(**b).loss.backward()
    ref = {n: w.grad.detach().clone() / len(batches) for n, w in bases.items()}
    for p, f in flags.items():
        p.requires_grad_(f)
        p.grad = None
    return ref


@pytest.mark.parametrize("which", ["llama", "vit"])
def test_hook_gradients_equal_autograd(which, tiny_llama, tiny_vit):
    if which == "llama":
        model, batches, targets = tiny_llama, _llama_batches(), ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"]
    else:
        model, batches = tiny_vit, _vit_batches()
        targets = [n.split(".")[-1] for n, m in model.vit.named_modules() if isinstance(m, torch.nn.Linear)]
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=sorted(set(targets))))
    layers = lora_layers(peft_model)
    # a non-zero adapter: the gradient must be taken at the effective weight W + s B A
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.normal_(0, 0.1)
    peft_model.eval()
    trainable_before = {n for n, p in peft_model.named_parameters() if p.requires_grad}

    grads = estimate_weight_gradients(peft_model, layers, batches)
    ref = _autograd_reference(peft_model, layers, batches)

    assert set(grads) == set(layers)
    for name in layers:
        assert grads[name].dtype == torch.float32
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-6)
    # nothing left behind: flags restored, no .grad accumulated
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == trainable_before
    assert all(p.grad is None for p in peft_model.parameters())


def test_plain_linear_layers_without_peft(tiny_llama):
    layers = {n: m for n, m in tiny_llama.named_modules() if n.endswith(("q_proj", "down_proj"))}
    batches = _llama_batches(2, seed=3)
    grads = estimate_weight_gradients(tiny_llama, layers, batches)
    for w in tiny_llama.parameters():
        w.requires_grad_(False)
    for m in layers.values():
        m.weight.requires_grad_(True)
    for b in batches:
        tiny_llama(**b).loss.backward()
    for n, m in layers.items():
        torch.testing.assert_close(grads[n], m.weight.grad / 2, rtol=1e-4, atol=1e-6)


def test_errors(tiny_llama):
    layers = {"q": tiny_llama.model.layers[0].self_attn.q_proj}
    with pytest.raises(ValueError, match="empty"):
        estimate_weight_gradients(tiny_llama, layers, [])
    with pytest.raises(ValueError, match="no target modules"):
        estimate_weight_gradients(tiny_llama, {}, _llama_batches(1))
    bad = _llama_batches(1)
    with pytest.raises(ValueError, match="non-finite loss"):
        estimate_weight_gradients(tiny_llama, layers, bad, loss_fn=lambda m, b: m(**b).loss * float("nan"))
