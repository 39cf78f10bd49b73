"""The recipes' model and data, built as a FederatedTrainer for the server or one client.

The run config picks the recipe (``recipe = "nlg"`` or ``"vit"``) and passes it the same
command-line arguments the recipe takes on one machine (``recipe-args``); a SuperNode
can append its own (``local-args`` in its node config, e.g. ``--data_files`` of its own
data, with ``local-data = true``: then that data is this client's, unsplit).
"""

from __future__ import annotations

import dataclasses
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


def _trainer(kwargs: dict, partition_id, config):
    """A recipe's trainer for the server (it evaluates) or one client: all the data split, or its own."""
    from fedsmooth_hf import FederatedTrainer

    if partition_id is not None:
        kwargs["eval_dataset"] = None  # only the server evaluates the global model
        if bool(config.get("local-data", False)):
            kwargs["fed_args"] = dataclasses.replace(kwargs["fed_args"], num_clients=1, clients_per_round=1)
            kwargs["client_datasets"] = [kwargs.pop("train_dataset")]
    return FederatedTrainer(**kwargs)


def build_nlg(partition_id, config):
    from transformers import set_seed

    from recipes import nlg_llama as recipe

    args, fed_args, md = recipe.parse_args(_argv(config))
    set_seed(args.seed)  # PEFT draws LoRA A at random: the same init on the server and every client
    return _trainer(recipe.build(args, fed_args, md), partition_id, config)


def build_vit(partition_id, config):
    # the offline default pretrains a small ViT (seeded, so every process on one machine gets the
    # same body; the server checks every client's base model against its own before round 1)
    from recipes import vit_classification as recipe

    args, fed_args, va = recipe.parse_args(_argv(config))
    kwargs, _ = recipe.build(args, fed_args, va)
    return _trainer(kwargs, partition_id, config)


def build_trainer(partition_id, config):
    """``fedsmooth_hf.flower`` calls this with ``partition_id=None`` on the server, the client's id on a node."""
    _import_recipes()
    recipe = str(config.get("recipe", "nlg"))
    builders = {"nlg": build_nlg, "vit": build_vit}
    if recipe not in builders:
        raise ValueError(f"recipe={recipe!r}: must be one of {sorted(builders)}")
    return builders[recipe](partition_id, config)
