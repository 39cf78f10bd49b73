"""What of the model a checkpoint holds, and the trainer's save and restore of a round.

Only what a round changes: the merged base weights of the adapted layers (or, beside a
4-bit base, the merged update as factors), and the fully trained ``modules_to_save``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..math.server_optim import split_optimizer_tensors
from ..model.adapter import set_parameters
from ..model.merge import base_residual, ensure_base_residual, is_quantized, keeps_residual
from .checkpoint import load_checkpoint, rng_state, save_checkpoint
from .checkpoint_checks import check_model_tensors, check_resumable, check_strategy_tensors, restore_rng_state

__all__ = ["model_tensors", "check_model_checkpoint", "restore_model_tensors", "save_round", "load_round"]


def model_tensors(layers: Mapping[str, torch.nn.Module], extras: Mapping[str, torch.Tensor]) -> dict:
    """What a round changes in the model, under ``model.safetensors``' keys.

    ``base/<layer>`` (an unquantized base weight), ``residual/<layer>/{B,A}`` (the merged
    update kept beside a quantized base) and ``extra/<name>`` (``modules_to_save`` values).
    """
    tensors = {}
    for name, layer in layers.items():
        base = layer.get_base_layer()
        if not is_quantized(base):
            tensors[f"base/{name}"] = base.weight.detach()
        res = base_residual(layer)
        if res is not None and res.B is not None:
            tensors[f"residual/{name}/B"] = res.B
            tensors[f"residual/{name}/A"] = res.A
    for n, v in extras.items():
        tensors[f"extra/{n}"] = v
    return tensors


def check_model_checkpoint(path, tensors: Mapping[str, torch.Tensor], layers, extras) -> None:
    """:func:`check_model_tensors` against what ``layers`` and ``extras`` would save now."""
    residual_shapes = {n: (layer.out_features, layer.in_features) for n, layer in layers.items()
                       if keeps_residual(layer.get_base_layer())}
    check_model_tensors(path, tensors, model_tensors(layers, extras), residual_shapes)


@torch.no_grad()
def restore_model_tensors(layers: Mapping[str, torch.nn.Module], tensors: Mapping[str, torch.Tensor]) -> dict:
    """Write checked :func:`model_tensors` back into ``layers``; returns the ``extra/`` values by name."""
    for name, layer in layers.items():
        key = f"base/{name}"
        if key in tensors:
            layer.get_base_layer().weight.copy_(tensors[key])
        if f"residual/{name}/B" in tensors:
            res = ensure_base_residual(layer)
            device = layer.get_base_layer().weight.device
            res.B = tensors[f"residual/{name}/B"].to(device)
            res.A = tensors[f"residual/{name}/A"].to(device)
    return {k[len("extra/"):]: v for k, v in tensors.items() if k.startswith("extra/")}


def save_round(trainer, round_number: int, resumable_state: dict) -> Path | None:
    """Write ``output_dir/round-<k>`` of a ``FederatedTrainer`` (process 0 writes; every process takes
    part in the ZeRO-3 gather); ``resumable_state``: the run's JSON state beside the tensors."""
    with trainer.gathered():
        tensors = model_tensors(trainer.layers, trainer.extra_parameters())
    if not trainer.args.should_save:
        return None
    state = {**resumable_state, "rng": rng_state()}
    strategy_tensors = {**trainer.strategy.state_dict(), **trainer.server_optimizer.state_dict()}
    return save_checkpoint(trainer.args.output_dir, round_number, tensors, strategy_tensors, state)


@torch.no_grad()
def load_round(trainer, path, may_change: set[str]) -> dict:
    """Restore a ``round-<k>`` checkpoint into a ``FederatedTrainer``: everything is checked before
    anything changes (``may_change``: the ``FederatedArguments`` a resumed run may set anew).
    Returns the checkpoint's JSON state."""
    with trainer.gathered(modify=True):
        tensors, strategy_tensors, state = load_checkpoint(path)
        check_resumable(path, state, trainer.fed_args.to_dict(), trainer.args.seed, may_change,
                        trainer.strategy.describe())
        check_model_checkpoint(path, tensors, trainer.layers, trainer.extra_parameters())
        optimizer_tensors = split_optimizer_tensors(strategy_tensors)
        check_strategy_tensors(path, strategy_tensors, trainer.strategy)
        restore_rng_state(path, state)
        set_parameters(trainer.model, restore_model_tensors(trainer.layers, tensors))
        trainer.strategy.load_state_dict(strategy_tensors)
        trainer.server_optimizer.load_state_dict(optimizer_tensors)
    return state
