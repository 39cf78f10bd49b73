"""The recipes' model and data, built as a FederatedTrainer for the server or one client.

The run config picks the recipe (``recipe = "nlg"``, ``"vit"`` or ``"lm-cls"``) and passes it the same
command-line arguments the recipe takes on one machine (``recipe-args``); a SuperNode
can append its own (``local-args`` in its node config, e.g. ``--data_files`` of its own
data, with ``local-data = true``: then that data is this client's, unsplit).
"""

from __future__ import annotations

import dataclasses
import importlib
import shlex
import sys
from pathlib import Path


def _import_recipes() -> None:
    """``recipes`` sits next to ``fedsmooth_hf`` in the repository (editable install) or at $FEDSMOOTH_REPO."""
    import os

    import fedsmooth_hf

    root = Path(os.environ.get("FEDSMOOTH_REPO") or Path(fedsmooth_hf.__file__).resolve().parents[1])
    if not (root / "recipes" / "nlg_llama.py").is_file():
        raise FileNotFoundError(f"recipes/ not found under {root}: set FEDSMOOTH_REPO to the fedsmooth_hf checkout")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def _argv(config) -> list[str]:
    return shlex.split(str(config.get("recipe-args", ""))) + shlex.split(str(config.get("local-args", "")))


def _trainer(run, partition_id, config):
    """A recipe's trainer for the server (it evaluates) or one client: all the data split, or its own.

    Args:
        run (`recipes.common.RecipeBuild`): What the recipe built.
        partition_id (`int`, *optional*): The client's id; `None` on the server.
        config (`dict`): The run config (`local-data`: this client's data is its own, unsplit).
    """
    if partition_id is None:
        return run.make_trainer()
    overrides = {"eval_dataset": None}  # only the server evaluates the global model
    if bool(config.get("local-data", False)):
        overrides["fed_args"] = dataclasses.replace(run.fed_args, num_clients=1, clients_per_round=1)
        overrides["client_datasets"] = [run.trainer_kwargs["train_dataset"]]
        overrides["train_dataset"] = None
    return run.make_trainer(**overrides)


#: recipe name in the run config -> the recipe module; every one has the same parse_args/build contract
RECIPES = {"nlg": "recipes.nlg_llama", "vit": "recipes.vit_classification", "lm-cls": "recipes.lm_classification"}


def build_trainer(partition_id, config):
    """``fedsmooth_hf.flower`` calls this with ``partition_id=None`` on the server, the client's id on a node.

    The ViT recipe's offline default pretrains a small ViT (seeded, so every process on one machine
    gets the same body; the server checks every client's base model against its own before round 1).
    """
    _import_recipes()
    name = str(config.get("recipe", "nlg"))
    if name not in RECIPES:
        raise ValueError(f"recipe={name!r}: must be one of {sorted(RECIPES)}")
    from transformers import set_seed

    recipe = importlib.import_module(RECIPES[name])
    args, fed_args, method, recipe_args = recipe.parse_args(_argv(config))
    set_seed(args.seed)  # PEFT draws LoRA A at random: the same init on the server and every client
    return _trainer(recipe.build(args, fed_args, method, recipe_args), partition_id, config)
