"""Loading never trusts a checkpoint: every file, key, shape, dtype and setting is checked first.

Each check raises :class:`~fedsmooth_hf.persistence.checkpoint.CheckpointError` naming the file
or key, before anything in the running job changes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import fields

import torch

from ..strategies.fedsmoothlora.config import FedSmoothLoRAConfig
from .checkpoint import MODEL_FILE, STATE_FILE, STRATEGY_FILE, CheckpointError, set_rng_state

__all__ = ["check_resumable", "check_model_tensors", "check_strategy_tensors", "restore_rng_state"]

#: ``FederatedArguments`` fields of checkpoints written before FedSmoothLoRA's options moved to
#: ``FedSmoothLoRAConfig``; they are compared with the strategy's options instead
MOVED_TO_STRATEGY = frozenset(f.name for f in fields(FedSmoothLoRAConfig))


def check_resumable(path, state: dict, fed_args: Mapping, seed: int, may_change: set[str],
                    strategy: Mapping | None = None) -> None:
    """Refuse to resume a run whose ``FederatedArguments`` (beyond ``may_change``), strategy options
    (``strategy``: its ``describe()``) or seed differ."""
    saved = {k: v for k, v in state["fed_args"].items() if k not in MOVED_TO_STRATEGY}
    for key, value in fed_args.items():
        if key not in may_change and key in saved and saved[key] != value:
            raise CheckpointError(
                f"checkpoint {path} was written with FederatedArguments.{key}={saved[key]!r}, "
                f"but this run has {value!r}"
            )
    unknown = sorted(set(saved) - set(fed_args))
    if unknown:
        raise CheckpointError(f"checkpoint {path}: unknown FederatedArguments field '{unknown[0]}' in {STATE_FILE}")
    if strategy is not None:  # older checkpoints kept the method's options among the FederatedArguments
        before = {**{k: v for k, v in state["fed_args"].items() if k in MOVED_TO_STRATEGY}, **state.get("strategy", {})}
        for key, value in strategy.items():
            if key not in may_change and key in before and before[key] != value:
                raise CheckpointError(
                    f"checkpoint {path} was written with the strategy option {key}={before[key]!r}, "
                    f"but this run has {value!r}"
                )
    if state.get("seed", seed) != seed:
        raise CheckpointError(
            f"checkpoint {path} was written with TrainingArguments.seed={state['seed']}, this run has {seed}"
        )


def _check_tensor(path, file: str, key: str, tensor: torch.Tensor, shape: tuple, dtypes) -> None:
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype not in dtypes:
        wanted = " or ".join(str(d) for d in dtypes)
        raise CheckpointError(
            f"checkpoint {path}: {file} '{key}' is {tuple(tensor.shape)} {tensor.dtype}, "
            f"the model needs {tuple(shape)} {wanted}"
        )
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise CheckpointError(f"checkpoint {path}: {file} '{key}' contains NaN or Inf")


def check_model_tensors(
    path,
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    residual_shapes: Mapping[str, tuple[int, int]],
) -> None:
    """``model.safetensors`` holds exactly the model's keys, with its shapes and dtypes.

    ``expected`` are the tensors the model would save now (``base/*``, ``extra/*``);
    ``residual/<layer>/{B,A}`` keys (the merged update kept beside a 4-bit or
    half-precision base) are optional, of any rank, and allowed only for the layers in
    ``residual_shapes`` (``name -> (d_out, d_in)``).
    """
    for key, tensor in tensors.items():
        if key.startswith("residual/"):
            layer, _, factor = key[len("residual/"):].rpartition("/")
            if layer not in residual_shapes or factor not in ("A", "B"):
                raise CheckpointError(f"checkpoint {path}: {MODEL_FILE} has unknown tensor '{key}'")
            partner = f"residual/{layer}/{'A' if factor == 'B' else 'B'}"
            if partner not in tensors:
                raise CheckpointError(f"checkpoint {path}: {MODEL_FILE} has '{key}' but lacks '{partner}'")
            d_out, d_in = residual_shapes[layer]
            B = tensors[f"residual/{layer}/B"]
            rank = B.shape[1] if B.dim() == 2 else -1  # a malformed B then fails its own shape check
            shape = (d_out, rank) if factor == "B" else (rank, d_in)
            _check_tensor(path, MODEL_FILE, key, tensor, shape, (torch.float32,))
            continue
        if key not in expected:
            raise CheckpointError(
                f"checkpoint {path}: {MODEL_FILE} has unknown tensor '{key}' (different model or target_modules?)"
            )
        _check_tensor(path, MODEL_FILE, key, tensor, expected[key].shape, (expected[key].dtype,))
    missing = [k for k in expected if not k.startswith("residual/") and k not in tensors]
    if missing:
        raise CheckpointError(f"checkpoint {path}: {MODEL_FILE} lacks tensor '{missing[0]}' ({len(missing)} missing)")


def check_strategy_tensors(path, tensors: Mapping[str, torch.Tensor], strategy) -> None:
    """``strategy.safetensors`` holds complete ``<prefix>/<layer>/{B,A}`` pairs the strategy reads back.

    Every pair must name an adapted layer, have the layer's shapes at rank r (or a
    smaller rank, for a client of ``client_ranks``) and float32 (or the adapter's) dtype; every prefix
    must cover all layers; and loading the tensors
    into a shallow copy of ``strategy`` and saving them again must give the same
    keys, so a key the strategy would silently ignore is reported too.
    """
    init = strategy.init_lora
    prefixes: dict[str, set[str]] = {}
    for key, tensor in tensors.items():
        parts = key.split("/")
        prefix, layer, factor = parts[0], "/".join(parts[1:-1]), parts[-1]
        if len(parts) < 3 or factor not in ("A", "B") or layer not in init:
            raise CheckpointError(f"checkpoint {path}: {STRATEGY_FILE} has unknown tensor '{key}'")
        partner = f"{prefix}/{layer}/{'A' if factor == 'B' else 'B'}"
        if partner not in tensors:
            raise CheckpointError(f"checkpoint {path}: {STRATEGY_FILE} has '{key}' but lacks '{partner}'")
        ref = init[layer][0 if factor == "B" else 1]
        shape = tuple(ref.shape)
        inner = tensor.shape[1 if factor == "B" else 0] if tensor.dim() == 2 else -1
        if 1 <= inner <= shape[1 if factor == "B" else 0]:  # a client of a smaller rank (client_ranks)
            shape = (shape[0], inner) if factor == "B" else (inner, shape[1])
        _check_tensor(path, STRATEGY_FILE, key, tensor, shape, {torch.float32, ref.dtype})
        prefixes.setdefault(prefix, set()).add(layer)
    for key, tensor in tensors.items():  # the shapes are right one by one; now B and A of a pair must agree
        if key.endswith("/B") and tensor.shape[1] != tensors[key[:-1] + "A"].shape[0]:
            raise CheckpointError(f"checkpoint {path}: {STRATEGY_FILE} '{key}' and its '/A' have different ranks")
    for prefix, layers in prefixes.items():
        absent = sorted(set(init) - layers)
        if absent:
            raise CheckpointError(f"checkpoint {path}: {STRATEGY_FILE} lacks '{prefix}/{absent[0]}/B' and '/A'")
    probe = copy.copy(strategy)
    probe.load_state_dict(dict(tensors))
    ignored = sorted(set(tensors) - set(probe.state_dict()))
    if ignored:
        raise CheckpointError(
            f"checkpoint {path}: {STRATEGY_FILE} has tensor '{ignored[0]}' that strategy "
            f"'{strategy.name}' does not use (written by another strategy?)"
        )


def restore_rng_state(path, state: dict) -> None:
    """:func:`set_rng_state` with a malformed ``rng`` entry reported as a checkpoint error."""
    try:
        set_rng_state(state["rng"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} 'rng' is malformed ({err!r})") from None
