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


def _clients(fed_args, train_ds, partition_id, config):
    """The whole federation's data (split as on one machine) or, with ``local-data``, this node's own."""
    if partition_id is not None and bool(config.get("local-data", False)):
        return dataclasses.replace(fed_args, num_clients=1, clients_per_round=1), {"client_datasets": [train_ds]}
    return fed_args, {"train_dataset": train_ds}


def build_nlg(partition_id, config):
    from transformers import set_seed

    from fedsmooth_hf import FederatedTrainer
    from fedsmooth_hf.callbacks import RoundPrinterCallback
    from recipes import nlg_llama as recipe

    args, fed_args, md = recipe.parse_args(_argv(config))
    set_seed(args.seed)
    model, tokenizer = recipe.load_model_and_tokenizer(md, args)
    train_raw, eval_raw = recipe.load_raw_data(md, args.seed)
    train_ds = recipe.tokenize_dataset(train_raw, tokenizer, md)
    eval_ds = None
    if partition_id is None:  # only the server evaluates the global model
        eval_ds = recipe.tokenize_dataset(eval_raw, tokenizer, md)
        eval_ds = eval_ds.remove_columns([c for c in eval_ds.column_names if c == "category"])
    fed_args, data = _clients(fed_args, train_ds, partition_id, config)
    return FederatedTrainer(model=model, args=args, fed_args=fed_args, eval_dataset=eval_ds,
                            data_collator=recipe.PadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                            callbacks=[RoundPrinterCallback(keys=("train_loss", "eval_loss"), perplexity=True)],
                            **data)


def build_vit(partition_id, config):
    from transformers import default_data_collator, set_seed

    from fedsmooth_hf import FederatedTrainer
    from recipes import vit_classification as recipe

    args, fed_args, va = recipe.parse_args(_argv(config))
    set_seed(args.seed)
    main_proc = args.process_index == 0
    if va.model_name_or_path is None:
        # the offline default pretrains a small ViT (seeded, so every process on one machine gets the
        # same body; the server checks every client's base model against its own before round 1)
        model, processor, train_ds, eval_ds, *_ = recipe.load_offline(va, args, main_proc)
    else:
        model, processor, train_ds, eval_ds, *_ = recipe.load_checkpoint_and_data(va, args, main_proc)
    recipe.check_modules_to_save(model, fed_args)
    if fed_args.partition_column == va.label_column:
        fed_args.partition_column = recipe.LABEL
    fed_args, data = _clients(fed_args, train_ds, partition_id, config)
    return FederatedTrainer(model=model, args=args, fed_args=fed_args,
                            eval_dataset=eval_ds if partition_id is None else None,
                            data_collator=default_data_collator, processing_class=processor,
                            compute_metrics=recipe.compute_accuracy, **data)


def build_trainer(partition_id, config):
    """``fedsmooth_hf.flower`` calls this with ``partition_id=None`` on the server, the client's id on a node."""
    _import_recipes()
    recipe = str(config.get("recipe", "nlg"))
    builders = {"nlg": build_nlg, "vit": build_vit}
    if recipe not in builders:
        raise ValueError(f"recipe={recipe!r}: must be one of {sorted(builders)}")
    return builders[recipe](partition_id, config)
