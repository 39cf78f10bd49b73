"""The PEFT plumbing: LoRA layers of a ``peft.PeftModel``, by module name.

Wrap a model with LoRA (:func:`add_lora`, target layers found by type), read and write
the adapter's factors, attach frozen low-rank offsets (a forward hook,
:class:`~fedsmooth_hf.model.offsets.LowRankHook`) and put a client's start into the
model. A FedSmoothLoRA client starts with ``LoRA (B, A) = SVD_r(B_ga A_ga + W_rm)`` and
frozen weight ``W - s B_ga A_ga``; the frozen part is never written into ``W`` (that would
need a copy of the base to undo, and cannot be done losslessly to a 4-bit weight), it is
an offset whose removal restores the base exactly.

This module knows nothing about rounds, clients or algorithms.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..math.factors import Factors
from .offsets import offset_hook

__all__ = [
    "ADAPTER",
    "find_target_modules",
    "add_lora",
    "wrap_lora",
    "lora_layers",
    "lora_scaling",
    "get_lora_factors",
    "set_lora_factors",
    "set_offsets",
    "clear_offsets",
    "apply_client_start",
    "copy_parameters",
    "set_parameters",
]

#: the adapter name the federation trains
ADAPTER = "default"
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "head")


def find_target_modules(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Names of every ``nn.Linear`` except the output head, found by type (not by name patterns).

    The head is the model's output embeddings, any top-level head named like
    ``lm_head``/``classifier``/``score``, and anything listed in ``exclude``.
    """
    head_ids = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        head_ids.add(id(out))
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in head_ids:
            continue
        last = name.rsplit(".", 1)[-1]
        if name in _HEAD_NAMES or last in exclude or any(name == h or name.startswith(f"{h}.") for h in exclude):
            continue
        names.append(name)
    return names


def add_lora(model: nn.Module, fed_args, peft_config=None) -> nn.Module:
    """``model`` with a LoRA adapter: ``peft_config``, else the one ``fed_args``' LoRA fields describe;
    a ``PeftModel`` is checked and kept as is. Target modules left unset are every ``nn.Linear``
    but the output head (and ``modules_to_save``)."""
    from peft import LoraConfig, PeftModel

    fa = fed_args
    if isinstance(model, PeftModel):
        if peft_config is not None:
            raise ValueError("FederatedTrainer got a PeftModel and a peft_config: the model already has its LoRA "
                             "config; pass the base model with peft_config, or the PeftModel alone")
        _check_lora_config(model.peft_config.get(ADAPTER))
        return model
    if peft_config is not None:
        _check_lora_config(peft_config)
        if peft_config.target_modules is None:
            peft_config.target_modules = find_target_modules(model, peft_config.modules_to_save or ())
        return wrap_lora(model, peft_config)
    targets = find_target_modules(model, fa.modules_to_save or ())
    if fa.target_modules:
        wanted = list(fa.target_modules)
        chosen = [n for n in targets if any(n == t or n.endswith("." + t) for t in wanted)]
        if not chosen:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in targets})
            raise ValueError(
                f"FederatedArguments.target_modules={wanted} match no Linear layer of "
                f"{type(model).__name__}; Linear layers end in: {suffixes}"
            )
        targets = chosen
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to adapt (target_modules)")
    config = LoraConfig(
        r=fa.lora_r,
        lora_alpha=fa.lora_alpha,
        lora_dropout=fa.lora_dropout,
        use_rslora=fa.use_rslora,
        target_modules=targets,
        modules_to_save=fa.modules_to_save,
    )
    return wrap_lora(model, config)


def wrap_lora(model: nn.Module, config) -> nn.Module:
    """``peft.get_peft_model(model, config)``, without the deprecation warning peft's own code raises.

    peft reads ``model.is_gradient_checkpointing``, a name transformers 5 deprecates in favour of
    ``is_activation_checkpointing`` with a ``FutureWarning`` on every wrap: the call is inside peft,
    so nothing here can use the new name, and the warning would name code the user cannot change.
    Every other warning passes.

    Args:
        model: the base model to adapt.
        config: its ``peft.LoraConfig``.
    """
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def _check_lora_config(config) -> None:
    """One LoRA adapter named 'default', one rank for every layer."""
    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        raise ValueError("FederatedTrainer needs a LoRA adapter named 'default' (a peft.LoraConfig)")
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError("LoRA rank_pattern/alpha_pattern are not supported: every layer needs the same rank")


def lora_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """LoRA layers of a PEFT model that carry ``adapter_name``, keyed by module name.

    Names are the model's own module paths, stable across rounds, so they key every
    per-module factor in the strategies and in checkpoints.
    """
    from peft.tuners.lora import LoraLayer

    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {})
    }
    if not layers:
        raise ValueError(f"the model has no LoRA layers with adapter '{adapter_name}'")
    return layers


def lora_scaling(layer: nn.Module, adapter_name: str = "default") -> float:
    """The scale ``s`` PEFT applies to ``B @ A``: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    return float(layer.scaling[adapter_name])


def get_lora_factors(layers: Mapping[str, nn.Module], adapter_name: str = "default") -> dict[str, Factors]:
    """Detached fp32 CPU copies ``name -> (B, A)`` of the adapter's factors."""
    out = {}
    for name, layer in layers.items():
        A = layer.lora_A[adapter_name].weight
        B = layer.lora_B[adapter_name].weight
        out[name] = (B.detach().float().cpu().clone(), A.detach().float().cpu().clone())
    return out


@torch.no_grad()
def set_lora_factors(
    layers: Mapping[str, nn.Module], factors: Mapping[str, Factors], adapter_name: str = "default"
) -> None:
    """Write ``(B, A)`` into the adapter in place (dtype and device of the adapter kept)."""
    for name, layer in layers.items():
        if name not in factors:
            raise KeyError(f"no LoRA factors given for module '{name}'")
        B, A = factors[name]
        wA = layer.lora_A[adapter_name].weight
        wB = layer.lora_B[adapter_name].weight
        if tuple(A.shape) != tuple(wA.shape) or tuple(B.shape) != tuple(wB.shape):
            raise ValueError(
                f"module '{name}': factors of shape B{tuple(B.shape)} A{tuple(A.shape)} do not fit the adapter "
                f"B{tuple(wB.shape)} A{tuple(wA.shape)}"
            )
        wA.copy_(A)
        wB.copy_(B)


_OFFSET_ATTR = "_fedsmooth_offset"


def set_offsets(
    layers: Mapping[str, nn.Module], offsets: Mapping[str, Factors], adapter_name: str = "default",
    fuse: bool = True,
) -> None:
    """Attach ``s * B_off @ A_off`` to each named layer (replacing any previous offset).

    ``fuse``: compute the offset together with the layer's plain LoRA adapter in one pair of
    matmuls where possible (:func:`~fedsmooth_hf.model.offsets.offset_hook`); the same sum.
    """
    clear_offsets(layers)
    for name, (B, A) in offsets.items():
        layer = layers[name]
        setattr(layer, _OFFSET_ATTR, offset_hook(layer, B, A, lora_scaling(layer, adapter_name), adapter_name, fuse))


def clear_offsets(layers: Mapping[str, nn.Module]) -> None:
    """Remove every frozen offset: the layers compute exactly ``W x + s B A x`` again."""
    for layer in layers.values():
        offset = getattr(layer, _OFFSET_ATTR, None)
        if offset is not None:
            offset.remove()
            delattr(layer, _OFFSET_ATTR)


def apply_client_start(
    layers: Mapping[str, nn.Module],
    lora: Mapping[str, Factors],
    offsets: Mapping[str, Factors],
    train_A: bool = True,
    train_B: bool = True,
    adapter_name: str = "default",
) -> None:
    """Put a client's starting point into the model in place: adapter, frozen offsets, what trains."""
    set_lora_factors(layers, lora, adapter_name)
    set_offsets(layers, offsets, adapter_name)
    for layer in layers.values():
        layer.lora_A[adapter_name].weight.requires_grad_(train_A)
        layer.lora_B[adapter_name].weight.requires_grad_(train_B)


def copy_parameters(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the named parameters (the fully trained ``modules_to_save``)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().float().cpu().clone() for n in names}


@torch.no_grad()
def set_parameters(model: nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    """Write ``name -> value`` into the model's parameters in place."""
    params = dict(model.named_parameters())
    for n, v in values.items():
        params[n].copy_(v)
