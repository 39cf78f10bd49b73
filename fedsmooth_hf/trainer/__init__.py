"""Layer 4, the HuggingFace glue: :class:`FederatedTrainer` (a ``transformers.Trainer``), the
federation's arguments and the LoRA config that carries the method's options."""

from importlib import import_module

_EXPORTS = {
    "FederatedTrainer": ".trainer",
    "ClientTrainingError": "..engine.result",
    "find_target_modules": "..model.adapter",
    "FederatedArguments": ".arguments",
    "FederatedTrainingArguments": ".arguments",
    "FederatedLoraConfig": ".lora_config",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
