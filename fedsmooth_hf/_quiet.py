"""Lines third-party libraries log on every run of this package that tell the user nothing: filtered out.

Each filter drops one known message of one library's logger and nothing else; why each cannot be
prevented from here is said beside it. Installed by ``fedsmooth_hf/__init__.py``, so a script that
imports ``fedsmooth_hf`` before ``transformers`` (the recipes do) never shows them. The filters sit on
the named loggers, which exist before their libraries are imported (``logging.getLogger`` makes them).
"""

from __future__ import annotations

import logging

__all__ = ["install", "DROPPED"]

#: logger name -> fragments of the messages dropped from it
DROPPED = {
    # `import peft` imports bitsandbytes wherever it is installed (4-bit or not), and bitsandbytes >= 0.48
    # looks on the Hub for a faster CPU 4-bit kernel at import: offline (HF_HUB_OFFLINE=1, the recipes' way)
    # it cannot, logs this, and keeps its own CPU kernel, the one it would use anyway.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # the same look-up, offline: the `kernels` package says it skips that kernel repository's trust check
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",),
    # accelerate imports DeepSpeed (where it is installed) in every Trainer, and DeepSpeed then says it
    # found no GPU; dropped only when torch finds no accelerator either (:func:`_no_accelerator`), so a
    # GPU that torch sees and DeepSpeed does not is still reported.
    "DeepSpeed": ("Setting accelerator to CPU. If you have GPU or other accelerator",),
}


def _no_accelerator() -> bool:
    import torch  # already imported by whoever logs: DeepSpeed checks for a GPU with torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())


class _DropKnown(logging.Filter):
    """Drops a record whose message contains one of ``fragments`` (the DeepSpeed one: without an accelerator)."""

    def __init__(self, logger_name: str, fragments: tuple[str, ...]):
        super().__init__()
        self.logger_name, self.fragments = logger_name, fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not any(f in message for f in self.fragments):
            return True
        return self.logger_name == "DeepSpeed" and not _no_accelerator()


def install() -> None:
    """Adds the filters to their loggers (once per logger, however often it is called)."""
    for name, fragments in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(name, fragments))
