"""Fixtures the Flower tests share."""

import pytest
from support.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved to disk: server, Ray actors and SuperNode workers all load it by path."""
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama().save_pretrained(path)
    return path
