"""Pytest configuration and fixtures; the helpers themselves live in ``tests/support``."""

from __future__ import annotations

import os

import pytest
import torch
from support.tiny import make_tiny_llama, make_tiny_vit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_vit():
    return make_tiny_vit()


@pytest.fixture
def make_trainer(tmp_path):
    """Builds tiny trainers (``tests/support/trainers.tiny_trainer``); the output dir defaults to ``tmp_path``."""
    from support.trainers import tiny_trainer

    def make(output_dir=None, **kwargs):
        return tiny_trainer(tmp_path if output_dir is None else output_dir, **kwargs)

    return make
