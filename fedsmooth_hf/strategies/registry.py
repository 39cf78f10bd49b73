"""One registry of strategy names, so every entry point accepts exactly the same set."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from .base import FederatedStrategy

_REGISTRY: dict[str, type[FederatedStrategy]] = {}


def register_strategy(cls: type[FederatedStrategy]) -> type[FederatedStrategy]:
    """Class decorator: make ``cls`` available as ``get_strategy(cls.name)``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty `name`")
    if cls.name in _REGISTRY:
        raise ValueError(f"strategy '{cls.name}' is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_strategies() -> list[str]:
    """Sorted names accepted by :func:`get_strategy` and ``FederatedArguments.strategy``."""
    return sorted(_REGISTRY)


def strategy_class(name: str) -> type[FederatedStrategy]:
    """The class registered under ``name`` (case-insensitive, ``-`` same as ``_``)."""
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown strategy '{name}'; valid strategies are: {', '.join(available_strategies())}"
        )
    return _REGISTRY[key]


def get_strategy(name: str, **kwargs: Any) -> FederatedStrategy:
    """Instantiate a strategy by name; an unknown name lists the valid ones."""
    return strategy_class(name)(**kwargs)


def strategy_from_options(name: str, options: Mapping[str, Any]) -> FederatedStrategy:
    """Instantiate ``name`` with the entries of ``options`` its constructor accepts.

    Lets one argument set configure any strategy: FedIT simply does not take ``gamma``.
    """
    cls = strategy_class(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = {k for k, p in params.items() if k != "self" and p.kind is not p.VAR_KEYWORD}
    if cls.config_class is not None:  # its options one by one, as FederatedTrainingArguments holds them
        accepted |= {f.name for f in fields(cls.config_class)}
    return cls(**{k: v for k, v in options.items() if k in accepted})
