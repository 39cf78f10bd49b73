"""Old import paths of the flat layout (before the layered subpackages): still importable, with a warning.

``import fedsmooth_hf.rounds`` or ``from fedsmooth_hf.lowrank import truncated_svd`` gives a
stand-in module that looks names up in their new homes (``MOVED``) and warns once per
module. Installed by ``fedsmooth_hf/__init__.py``; nothing in the package imports through it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

#: old module -> the modules that now hold its public names, the main one first
MOVED = {
    "arguments": ("trainer.arguments",),
    "lowrank": ("math.lowrank",),
    "sketch": ("math.sketch",),
    "gradient_aligned": ("math.gradient_aligned",),
    "server_optim": ("math.server_optim",),
    "factor_keys": ("math.factors",),
    "adapter": ("model.adapter",),
    "gradients": ("model.gradients", "math.sketch"),
    "merge": ("model.merge",),
    "proximal": ("model.proximal",),
    "distributed": ("model.distributed",),
    "lowrank_hook": ("model.offsets",),
    "client_rank": ("model.client_rank", "math.lowrank"),
    "partition": ("data.partition", "data.summary"),
    "executor": ("engine.executor", "engine.result"),
    "rounds": ("engine.rounds", "engine.sequential", "engine.client_parallel", "engine.executor", "engine.result"),
    "local_round": ("engine.local_round",),
    "client_eval": ("engine.client_eval",),
    "callbacks": ("engine.callbacks",),
    "checkpoint": ("persistence.checkpoint", "persistence.checkpoint_checks", "persistence.model_state"),
    "hub": ("persistence.hub",),
}
PACKAGE = __name__.rsplit(".", 1)[0]


class MovedModule(types.ModuleType):
    """Stands in for an old module: attributes come from the new ones."""

    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name, f"Moved: {name} is now {', '.join(f'{PACKAGE}.{t}' for t in targets)}.")
        self.__targets = targets

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self.__targets:
            module = importlib.import_module(f"{PACKAGE}.{target}")
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {PACKAGE}.{self.__targets[0]}) has no "
                             f"attribute {attr!r}")


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``fedsmooth_hf.<old>`` for every old module in :data:`MOVED`."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package == PACKAGE and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return MovedModule(spec.name, MOVED[spec.name.rpartition(".")[2]])

    def exec_module(self, module):
        warnings.warn(f"{module.__name__} moved to {PACKAGE}.{MOVED[module.__name__.rpartition('.')[2]][0]}; "
                      "the old path will be removed in a future release", FutureWarning, stacklevel=3)


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
