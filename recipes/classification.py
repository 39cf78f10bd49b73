"""What the classifier recipes (ViT on images, a language model on texts) share: labels, accuracy and the report.

The report is the same for both: the global model's accuracy every round, then a final prediction
on the held-out set, ``confusion_matrix.png``, ``accuracy_by_round.png``, ``results.json`` and the
merged model in ``output_dir``.
"""

from __future__ import annotations

import functools
import gc
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fedsmooth_hf import FederatedArguments
from fedsmooth_hf.engine.local_round import unpinned_without_accelerator
from recipes.common import RecipeBuild, resume_argument, save_and_push
from recipes.plots import confusion_matrix, plot_accuracy_by_round, plot_confusion_matrix

LABEL = "label"  # the classifiers' label column; a user's --label_column is renamed to it
ROUND_KEYS = ("eval_accuracy", "client_eval_accuracy_mean", "client_eval_accuracy_worst", "eval_loss", "train_loss")


@functools.cache
def accuracy_metric():
    """Returns `evaluate`'s accuracy where it loads (the Hub or its cache); offline `None`, said once."""
    try:
        import evaluate

        return evaluate.load("accuracy")
    except Exception as error:  # noqa: BLE001 - offline, no cache, or no evaluate: any of them means local
        print(f"note: evaluate.load('accuracy') is unavailable ({type(error).__name__}); accuracy is computed locally",
              flush=True)
        return None


def compute_accuracy(eval_pred) -> dict:
    """Top-1 accuracy, the `compute_metrics` of both classifier recipes.

    Args:
        eval_pred (`transformers.EvalPrediction`): Logits (or a tuple whose first entry they are) and label ids.

    Returns:
        `dict`: `{"accuracy": float}`, through `evaluate` when it loads, else the same count done locally.
    """
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    predictions, labels = np.asarray(logits).argmax(-1), np.asarray(eval_pred.label_ids)
    metric = accuracy_metric()
    if metric is not None:
        return {"accuracy": float(metric.compute(predictions=predictions, references=labels)["accuracy"])}
    return {"accuracy": float((predictions == labels).mean())}


def encode_labels(train, evals, column: str):
    """Turns a label column into integer ids under the column name `label`.

    A `ClassLabel` column keeps its names; any other column's distinct training values become the
    classes in sorted order, and held-out rows whose label never occurs in training are dropped (said).

    Args:
        train (`datasets.Dataset`): Training rows.
        evals (`datasets.Dataset`): Held-out rows.
        column (`str`): The label column.

    Returns:
        `(train, evals, class_names)`: both datasets with a `ClassLabel` column `label`, and its names.
    """
    from datasets import ClassLabel

    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        if column != LABEL:
            train, evals = train.rename_column(column, LABEL), evals.rename_column(column, LABEL)
        return train, evals, names
    uniques = set(train.with_format(None)[column])
    try:
        uniques = sorted(uniques)
    except TypeError:  # mixed types
        uniques = sorted(uniques, key=str)
    ids = {v: i for i, v in enumerate(uniques)}

    def encode(batch):
        return {LABEL: [ids[v] for v in batch[column]]}

    drop = [column] if column != LABEL else []
    train = train.map(encode, batched=True, remove_columns=drop)
    n_eval = len(evals)
    evals = evals.filter(lambda b: [v in ids for v in b[column]], batched=True)
    if len(evals) < n_eval:
        print(f"[recipe] dropped {n_eval - len(evals)} eval examples whose label never occurs in the training data")
    evals = evals.map(encode, batched=True, remove_columns=drop)
    names = [str(v) for v in uniques]
    feature = ClassLabel(names=names)
    return train.cast_column(LABEL, feature), evals.cast_column(LABEL, feature), names


def label_maps(class_names: list[str]) -> dict:
    """Returns the `id2label` and `label2id` entries of a model config for `class_names`."""
    return {"id2label": dict(enumerate(class_names)), "label2id": {n: i for i, n in enumerate(class_names)}}


def check_modules_to_save(model, fed_args: FederatedArguments) -> None:
    """Raises `ValueError` when a `--modules_to_save` name matches no module of `model` (naming its top-level ones)."""
    names = [n for n, _ in model.named_modules()]
    for wanted in fed_args.modules_to_save or ():
        if not any(n == wanted or n.endswith("." + wanted) for n in names):
            heads = [n for n in names if n and "." not in n]
            raise ValueError(
                f"--modules_to_save {wanted}: {type(model).__name__} has no such module (its top-level modules: "
                f"{heads}); name the classification head of this architecture"
            )


def round_printer():
    """Returns the callback that prints the accuracy (and losses) of every round."""
    from fedsmooth_hf.engine.callbacks import RoundPrinterCallback

    return RoundPrinterCallback(keys=ROUND_KEYS)


def train_and_report(trainer, run: RecipeBuild, recipe_args, t0: float, plot_dir: str | None = None,
                     unit: str = "examples") -> dict:
    """Trains the federation, then writes the final accuracy, the plots, `results.json` and the merged model.

    Args:
        trainer (`FederatedTrainer`): The trainer of `run` (`run.make_trainer()`).
        run (`RecipeBuild`): What the recipe built; `class_names` must be set.
        recipe_args (dataclass): The recipe's own arguments, recorded in `results.json`.
        t0 (`float`): `time.perf_counter()` at the start of the run, for the wall time.
        plot_dir (`str`, *optional*): Where the PNGs go; defaults to `output_dir`.
        unit (`str`, *optional*, defaults to `"examples"`): What one example is, in the printed lines.

    Returns:
        `dict`: the content of `results.json` (empty on processes other than the main one).
    """
    args, fed_args, class_names, source = trainer.args, trainer.fed_args, run.class_names, run.data_source
    main_proc = trainer.is_world_process_zero()
    eval_ds = trainer.eval_dataset
    n_train = sum(len(c) for c in trainer.client_datasets)
    if main_proc:
        from fedsmooth_hf.data.partition import partition_summary

        print(f"[recipe] {n_train} training {unit} over {fed_args.num_clients} clients "
              f"({fed_args.partition}, {fed_args.clients_per_round} per round), {len(eval_ds)} eval {unit}; "
              f"strategy={fed_args.strategy}, {fed_args.num_rounds} rounds x {fed_args.local_steps} local steps, "
              f"LoRA r={trainer.lora_rank} on {len(trainer.layers)} Linear layers, "
              f"trained in full: {fed_args.modules_to_save}")
        print(f"[recipe] strategy in force: {trainer.strategy.summary()}")
        print(partition_summary(trainer.client_datasets, fed_args.partition_column), flush=True)
    t_fed = time.perf_counter()
    # Trainer runs a full gc.collect() at every local round (accelerate's free_memory); with many
    # long-lived objects from the imports that is slow on a small CPU. Freezing them first leaves the
    # collector only the objects the rounds create.
    gc.collect()
    gc.freeze()
    try:
        trainer.train(resume_from_checkpoint=resume_argument(args))
    finally:
        gc.unfreeze()
    fed_time = time.perf_counter() - t_fed

    with unpinned_without_accelerator(trainer.args):  # no pinned memory without an accelerator (torch warns)
        output = trainer.predict(eval_ds)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    predictions, labels = np.asarray(logits).argmax(-1), np.asarray(output.label_ids)
    accuracy = float((predictions == labels).mean())
    chance = 1.0 / len(class_names)
    results, paths = {}, ()
    if main_proc:
        folder = Path(plot_dir or args.output_dir)
        cm = confusion_matrix(labels, predictions, len(class_names))
        paths = (
            plot_confusion_matrix(cm, class_names, folder / "confusion_matrix.png",
                                  f"{source}, {fed_args.strategy}: accuracy {accuracy:.3f}"),
            plot_accuracy_by_round(trainer.round_history, chance, folder / "accuracy_by_round.png",
                                   f"{run.model_name} on {source}\n{fed_args.strategy}, {fed_args.num_clients} "
                                   f"clients ({fed_args.partition}), {fed_args.num_rounds} rounds x "
                                   f"{fed_args.local_steps} steps"),
        )
        results = {
            "final_accuracy": accuracy,
            "final_eval_loss": float(output.metrics.get("test_loss", float("nan"))),
            "chance_accuracy": chance,
            "data_source": source,
            "model": run.model_name,
            "pretraining": run.pretraining,
            "class_names": class_names,
            "num_train": n_train,
            "num_eval": len(eval_ds),
            "accuracy_by_round": [
                {"round": r["round"], "eval_accuracy": r["eval_accuracy"], "eval_loss": r.get("eval_loss")}
                for r in trainer.round_history if "eval_accuracy" in r
            ],
            "round_history": trainer.round_history,
            "confusion_matrix": cm.tolist(),
            "federated_time_s": fed_time,
            "wall_time_s": time.perf_counter() - t0,
            "settings": {
                "federated": fed_args.to_dict(),
                "method": asdict(run.method) if run.method is not None else None,
                "recipe": asdict(recipe_args),
                "training": {k: getattr(args, k) for k in (
                    "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "weight_decay",
                    "seed", "bf16", "fp16")} | {"lr_scheduler_type": str(args.lr_scheduler_type),
                                                "optim": str(args.optim)},
            },
        }
    results_path = save_and_push(trainer, results)
    if main_proc:
        print(f"[recipe] final accuracy {accuracy:.4f} on {len(eval_ds)} {source} eval {unit} "
              f"(chance {chance:.2f}); federated training {fed_time:.0f} s, total {results['wall_time_s']:.0f} s")
        print(f"[recipe] merged model (from_pretrained-loadable) saved to {args.output_dir}")
        print(f"[recipe] results: {results_path}")
        print(f"[recipe] plots: {', '.join(map(str, paths))}", flush=True)
    return results
