"""The frozen offset fused with the LoRA adapter, and the calibration pass that skips a zero adapter.

Both are speed-ups that must not change what is computed: the fused forward and its gradients equal
PEFT's adapter plus the separate offset hook, removing it gives PEFT's forward back bit for bit, and
skipping an adapter whose ``B`` is zero gives the very same gradient estimates.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from support.tiny import make_tiny_llama

from fedsmooth_hf.model.adapter import clear_offsets, lora_layers, set_offsets
from fedsmooth_hf.model.gradients import estimate_gradient_subspaces
from fedsmooth_hf.model.offsets import FusedLoraOffset, LowRankHook, can_fuse, zero_adapters_bypassed

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(dropout: float = 0.0):
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                         target_modules=TARGETS)).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _offsets(layers, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(l.out_features, 4, generator=gen), torch.randn(4, l.in_features, generator=gen))
            for n, l in layers.items()}


def _forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def test_fused_offset_equals_adapter_plus_separate_hook_and_removes_exactly():
    model = _model()
    model.train()
    layers = lora_layers(model)
    offsets = _offsets(layers)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    plain_logits, _ = _forward_backward(model, ids)

    set_offsets(layers, offsets, fuse=False)
    assert all(type(l._fedsmooth_offset) is LowRankHook for l in layers.values())
    ref_logits, ref_grads = _forward_backward(model, ids)
    clear_offsets(layers)

    set_offsets(layers, offsets)
    assert all(isinstance(l._fedsmooth_offset, FusedLoraOffset) for l in layers.values())
    calls = []
    spies = [l.lora_A["default"].register_forward_pre_hook(lambda *a: calls.append(1)) for l in layers.values()]
    try:
        logits, grads = _forward_backward(model, ids)  # hooks added after fusing: lora_A is not run at all
    finally:
        for h in spies:
            h.remove()
    clear_offsets(layers)
    assert calls == []
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    assert set(grads) == set(ref_grads) and len(grads) == 2 * len(layers)  # every A and B gets its gradient
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-9, atol=1e-10)
    assert not (logits - plain_logits).abs().max() < 1e-6  # the offset really changed the output
    # removed: PEFT's own forward again, bit for bit
    assert all(not l.disable_adapters for l in layers.values())
    assert torch.equal(_forward_backward(model, ids)[0], plain_logits)


def test_offsets_are_not_fused_where_the_adapter_is_not_plain_lora():
    dropped = lora_layers(_model(dropout=0.1))
    assert not any(can_fuse(l, "default") for l in dropped.values())  # the offset must see the undropped input
    set_offsets(dropped, _offsets(dropped))
    assert all(type(l._fedsmooth_offset) is LowRankHook for l in dropped.values())
    clear_offsets(dropped)

    layers = lora_layers(_model())
    name = next(iter(layers))
    handle = layers[name].lora_A["default"].register_forward_hook(lambda *a: None)
    set_offsets(layers, _offsets(layers))  # someone hooks lora_A: it must keep running
    assert type(layers[name]._fedsmooth_offset) is LowRankHook
    assert all(isinstance(l._fedsmooth_offset, FusedLoraOffset) for n, l in layers.items() if n != name)
    clear_offsets(layers)
    handle.remove()


def test_zero_adapter_bypass_gives_the_same_gradient_estimates():
    model = _model()
    layers = lora_layers(model)
    with torch.no_grad():
        for l in layers.values():
            l.lora_B["default"].weight.zero_()
    keep = next(iter(layers))
    with torch.no_grad():
        layers[keep].lora_B["default"].weight.fill_(0.5)  # a non-zero B must keep its adapter
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(4))
    batches = [{"input_ids": ids, "labels": ids}]
    set_offsets(layers, _offsets(layers))
    full = estimate_gradient_subspaces(model, layers, batches, estimator="dense")
    clear_offsets(layers)
    with zero_adapters_bypassed(layers, "default"):
        assert layers[keep].disable_adapters is False
        assert all(l.disable_adapters for n, l in layers.items() if n != keep)
        set_offsets(layers, _offsets(layers))  # inside the bypass: separate hooks, nothing to fuse with
        assert all(type(l._fedsmooth_offset) is LowRankHook for n, l in layers.items() if n != keep)
        skipped = estimate_gradient_subspaces(model, layers, batches, estimator="dense")
        clear_offsets(layers)
    assert all(not l.disable_adapters for l in layers.values())
    for n in layers:
        assert torch.equal(skipped[n].grad, full[n].grad), n
