"""Starting the federation's adapter from one of peft's own ``init_lora_weights`` (gaussian, PiSSA, OLoRA, LoRA-GA).

peft initializes the adapter when it wraps the model; some inits also rewrite the base weights of the
adapted layers (PiSSA, OLoRA, LoRA-GA, CorDA, LoftQ keep ``W - s B0 A0`` as the base, a *residual*, so
the wrapped model still computes ``W``). The federation then starts from exactly that: the round-0
global adapter is peft's ``(B0, A0)`` and the base is peft's residual, so merges, checkpoints and
exports all see the model peft built. What a run exports is relative to the original weights: the
merged model is the whole global model, and ``export_adapter`` is given the original model again.

LoRA-GA is data-dependent: it needs full-weight gradients, computed here once, before round 1, on a
dataset the server holds (:func:`calibrate_lora_ga`), never on a client's data.

This module knows nothing about strategies or rounds.
"""

from __future__ import annotations

import inspect
import logging
import warnings

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["MAX_CALIBRATION_SAMPLES", "init_lora_weights", "is_default_init", "changes_base_weights",
           "is_data_dependent", "check_init_supported", "calibrate_lora_ga"]

#: LoRA-GA calibrates on at most this many examples of the init dataset (its first ones)
MAX_CALIBRATION_SAMPLES = 256
#: inits that need data; LoRA-GA is supported, the others are refused with the reason
DATA_DEPENDENT = ("lora_ga", "eva", "corda")
#: inits that keep a residual ``W - s B0 A0`` (or, LoftQ, a re-quantized weight) as the base
_RESIDUAL = ("pissa", "olora", "lora_ga", "corda", "loftq")
_UNSUPPORTED = {
    "eva": "EVA redistributes ranks over layers after wrapping (the federation needs one rank everywhere) and "
           "calibrates on the wrapped model's activations",
    "corda": "CorDA calibrates through peft's own covariance hooks on a run's data before wrapping",
    "mica": "MiCA is a LoRA variant with its own forward and a frozen B the strategies do not know of",
}


def init_lora_weights(config) -> bool | str:
    """The config's ``init_lora_weights`` (``True``, peft's default, without a config)."""
    return True if config is None else config.init_lora_weights


def is_default_init(config) -> bool:
    """Whether the adapter starts as peft's default (``B = 0``, Kaiming ``A``): nothing to check or calibrate."""
    return init_lora_weights(config) is True


def changes_base_weights(config) -> bool:
    """Whether peft rewrites the adapted layers' base weights when it wraps the model (PiSSA, OLoRA, LoRA-GA, ...)."""
    init = init_lora_weights(config)
    return isinstance(init, str) and init.startswith(_RESIDUAL)


def is_data_dependent(config) -> bool:
    """Whether the init needs data (LoRA-GA, EVA, CorDA)."""
    return init_lora_weights(config) in DATA_DEPENDENT


def check_init_supported(config, strategy: str, accepts_peft_init: bool, init_dataset, client_parallel: bool,
                         wrapped: bool = False) -> None:
    """Refuse, before anything is computed, a peft init the run could not honour.

    Args:
        config: the run's LoRA config (``None``: peft's default init, always fine).
        strategy: the strategy's name, for the message.
        accepts_peft_init: whether the strategy keeps one shared adapter that the init can become
            (``FederatedStrategy.accepts_peft_init``); the others build their own client starts.
        init_dataset: the server's calibration data (required by LoRA-GA, never taken from a client).
        client_parallel: whether several processes each build this model: a residual base computed in
            each of them is not checked to agree, so it is refused rather than risked.
        wrapped: the model came as a ``PeftModel``, its init already done (no data needed any more).
    """
    init = init_lora_weights(config)
    if init_dataset is not None and (wrapped or init != "lora_ga"):
        logger.warning("init_dataset is ignored: init_lora_weights=%r needs no data here", init)
    if is_default_init(config):
        return
    if init in _UNSUPPORTED:
        raise ValueError(f"init_lora_weights={init!r} is not supported by federated training: "
                         f"{_UNSUPPORTED[init]}; use 'lora_ga', 'pissa', 'olora', 'gaussian' or the default")
    if not accepts_peft_init:
        raise ValueError(
            f"init_lora_weights={init!r} with strategy '{strategy}': this strategy does not keep one shared adapter "
            "for peft's init to become (it builds each client's start itself); use init_lora_weights=True "
            "(peft's default), or a strategy that does: fedit, ffa_lora, fedex_lora")
    if init == "lora_ga" and init_dataset is None and not wrapped:
        raise ValueError(
            "init_lora_weights='lora_ga' calibrates on data the server holds: pass FederatedTrainer(..., "
            "init_dataset=<server examples>) (the recipes: --server_calibration_samples N); a client's data "
            "is never used for it")
    if client_parallel and (changes_base_weights(config) or is_data_dependent(config)):
        raise ValueError(
            f"init_lora_weights={init!r} with client_parallel: every process would compute its own residual base "
            "weights, which nothing makes agree; run without client_parallel (data-parallel local rounds)")


def _forward_columns(model: nn.Module, dataset):
    """``dataset`` without the columns ``model.forward`` does not take, as ``Trainer`` feeds it."""
    names = getattr(dataset, "column_names", None)
    if names is None:
        return dataset
    accepted = set(inspect.signature(model.forward).parameters) | {"label", "label_ids", "labels"}
    unused = [c for c in names if c not in accepted]
    return dataset.remove_columns(unused) if unused else dataset


def calibrate_lora_ga(model: nn.Module, config, init_dataset, collator, batch_size: int,
                      device: torch.device | str | None = None,
                      max_samples: int = MAX_CALIBRATION_SAMPLES) -> int:
    """Run peft's LoRA-GA gradient estimate on ``init_dataset`` (the server's examples), before ``get_peft_model``.

    The gradients are averaged over batches of ``batch_size`` (the run's per-device batch size)
    made by ``collator`` (the run's collator), so they estimate what the clients' first steps see.

    Args:
        model: the base model (not yet wrapped); its ``config.target_modules`` layers get the gradient.
        config: a ``LoraConfig`` with ``init_lora_weights="lora_ga"`` (``lora_ga_config`` defaults if unset).
        init_dataset: examples with labels (each batch must give the model a loss).
        collator: turns a list of examples into a batch.
        batch_size: examples per backward pass.
        device: where the batches go (the model's device by default).
        max_samples: calibrate on at most this many of the first examples.

    Returns:
        The number of examples used.
    """
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    if config.lora_ga_config is None:
        config.lora_ga_config = LoraGAConfig()
    data = _forward_columns(model, init_dataset)
    n = min(len(data), max_samples)
    if n < 1:
        raise ValueError("init_lora_weights='lora_ga': init_dataset is empty")
    if hasattr(data, "select"):
        data = data.select(range(n))
    else:
        data = [data[i] for i in range(n)]
    loader = torch.utils.data.DataLoader(data, batch_size=max(1, batch_size), shuffle=False, collate_fn=collator)
    device = device or next(model.parameters()).device

    def train_step() -> None:
        for batch in loader:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss = model(**batch).loss
            if loss is None:
                raise ValueError("init_lora_weights='lora_ga': the model returned no loss on init_dataset "
                                 "(its examples need labels)")
            loss.backward()

    with warnings.catch_warnings():  # peft's counting hooks fire with no input needing a gradient, as intended
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        preprocess_loraga(model, config, train_step)
    logger.info("LoRA-GA: calibrated on %d server examples (batches of %d)", n, batch_size)
    return n
