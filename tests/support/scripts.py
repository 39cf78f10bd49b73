"""Loading a repository script that is not an installed module (``benchmarks/*.py``, ``tests/distributed_worker.py``,
``recipes/data/*.py``) from its path, so a test does not depend on the repository root being on ``sys.path``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def load_script(path: Path, name: str) -> ModuleType:
    """The module that executing the file at ``path`` makes, under the module name ``name``.

    Args:
        path (`Path`): The script.
        name (`str`): Its module name (distinct from any importable one, so nothing cached is shadowed).
    """
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
