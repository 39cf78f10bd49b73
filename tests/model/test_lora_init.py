"""Client starts: Gradient-Aligned factors and frozen offsets keep the effective weights as intended."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedsmooth_hf.math.gradient_aligned import client_init_factors, gradient_aligned_factors
from fedsmooth_hf.model.adapter import (
    apply_client_start,
    clear_offsets,
    get_lora_factors,
    lora_layers,
    lora_scaling,
)
from fedsmooth_hf.model.merge import dense_base_weight

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_gradient_aligned_factors_formula():
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    r, gamma = 3, 16.0
    B, A = gradient_aligned_factors(G, r, gamma)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    k = 24**0.25 / math.sqrt(gamma)
    # singular vectors are unique up to sign: compare the products column by column
    for i in range(r):
        torch.testing.assert_close(torch.outer(B[:, i], B[:, i]), k**2 * torch.outer(U[:, r + i], U[:, r + i]))
        torch.testing.assert_close(torch.outer(A[i], A[i]), k**2 * torch.outer(Vh[i], Vh[i]))
    assert B.shape == (24, r) and A.shape == (r, 40)


def test_gradient_aligned_rank_too_large():
    with pytest.raises(ValueError, match="lora_r=6 is too large"):
        gradient_aligned_factors(torch.randn(10, 30), 6, 64.0)


def _peft_llama(tiny_llama, r=4, rslora=False):
    model = get_peft_model(tiny_llama, LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS, use_rslora=rslora))
    model.eval()
    return model, lora_layers(model)


def _random_grads(layers, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(l.get_base_layer().weight.shape, generator=gen) for n, l in layers.items()}


def _effective_weights(layers):
    out = {}
    for n, layer in layers.items():
        s = lora_scaling(layer)
        B = layer.lora_B["default"].weight.detach()
        A = layer.lora_A["default"].weight.detach()
        out[n] = dense_base_weight(layer) + s * B @ A
    return out


@pytest.mark.parametrize("rslora", [False, True])
def test_round0_start_leaves_outputs_unchanged(tiny_llama, rslora):
    model, layers = _peft_llama(tiny_llama, rslora=rslora)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    grads = _random_grads(layers)
    lora, offsets = {}, {}
    for n in layers:
        (B, A), (B_ga, A_ga) = client_init_factors(grads[n], 4, 64.0)
        lora[n], offsets[n] = (B, A), (-B_ga, A_ga)
    apply_client_start(layers, lora, offsets)
    # the adapter really is the gradient-aligned one, so outputs would move without the offset
    assert all(torch.linalg.norm(B) > 0 for B, _ in get_lora_factors(layers).values())
    with torch.no_grad():
        after = model(input_ids=ids).logits
        assert (after - before).abs().max() <= 1e-5
        clear_offsets(layers)
        moved = model(input_ids=ids).logits
    assert (moved - before).abs().max() > 1e-3


def _offset_dense(layer, offsets, n):
    B, A = offsets[n]
    return lora_scaling(layer) * B @ A


def test_later_round_start_exact_when_rank_has_room(tiny_llama):
    model, layers = _peft_llama(tiny_llama)
    grads = _random_grads(layers, seed=2)
    W0 = {n: dense_base_weight(l).clone() for n, l in layers.items()}
    lora, offsets, rm_dense = {}, {}, {}
    for n in layers:
        B_ga, A_ga = gradient_aligned_factors(grads[n], 4, 64.0)
        # W_rm inside the span of B_ga A_ga (plus a rank-deficient twist): SVD_r is exact
        rm = (0.7 * B_ga, A_ga)
        rm_dense[n] = rm[0] @ rm[1]
        (B, A), (Bg, Ag) = client_init_factors(grads[n], 4, 64.0, rm)
        lora[n], offsets[n] = (B, A), (-Bg, Ag)
    apply_client_start(layers, lora, offsets)
    eff = _effective_weights(layers)
    for n, layer in layers.items():
        s = lora_scaling(layer)
        got = eff[n] + _offset_dense(layer, offsets, n)
        torch.testing.assert_close(got, W0[n] + s * rm_dense[n], rtol=1e-5, atol=1e-6)


def test_later_round_start_documented_truncation(tiny_llama):
    model, layers = _peft_llama(tiny_llama)
    grads = _random_grads(layers, seed=3)
    gen = torch.Generator().manual_seed(4)
    for n, layer in layers.items():
        d_out, d_in = layer.get_base_layer().weight.shape
        rm = (torch.randn(d_out, 8, generator=gen), torch.randn(8, d_in, generator=gen) * 0.01)
        (B, A), (B_ga, A_ga) = client_init_factors(grads[n], 4, 64.0, rm)
        target = B_ga @ A_ga + rm[0] @ rm[1]
        U, S, Vh = torch.linalg.svd(target.double())
        best = (U[:, :4] * S[:4]) @ Vh[:4]
        torch.testing.assert_close((B @ A).double(), best, rtol=1e-4, atol=1e-6)


def test_frozen_offset_hook_never_touches_base_weight(tiny_llama):
    model, layers = _peft_llama(tiny_llama)
    base_before = {n: l.get_base_layer().weight.detach().clone() for n, l in layers.items()}
    grads = _random_grads(layers)
    lora, offsets = {}, {}
    for n in layers:
        (B, A), (B_ga, A_ga) = client_init_factors(grads[n], 4, 64.0)
        lora[n], offsets[n] = (B, A), (-B_ga, A_ga)
    apply_client_start(layers, lora, offsets, train_A=False)
    assert not any(l.lora_A["default"].weight.requires_grad for l in layers.values())
    assert all(l.lora_B["default"].weight.requires_grad for l in layers.values())
    keys = set(model.state_dict())
    clear_offsets(layers)
    assert keys == set(model.state_dict()), "offsets must not appear in the state dict"
    for n, l in layers.items():
        assert torch.equal(l.get_base_layer().weight, base_before[n])
