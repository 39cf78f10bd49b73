"""Federated LoRA fine-tuning of an image classifier with FedSmoothLoRA (or a baseline).

    python recipes/vit_classification.py                          # offline default
    accelerate launch recipes/vit_classification.py --strategy fedit --num_rounds 20
    python recipes/vit_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \\
        --dataset_name cifar10 --image_column img --num_clients 20 --num_rounds 50 --bf16
    python recipes/vit_classification.py --model_name_or_path my/vit --dataset_name imagefolder \\
        --train_dir path/to/images                                # one sub-folder per class
    python recipes/vit_classification.py config.yaml --num_rounds 5   # a config file, then overrides

Every LoRA target is found by type (each ``nn.Linear`` except the head, whatever the
architecture calls it); the new classification head (``--modules_to_save classifier``) is
trained in full by every client and averaged by the server.

Offline default (no ``--model_name_or_path``): no pretrained ViT can be downloaded here, so the
recipe first pretrains a small ViT on a disjoint source task, scikit-learn's bundled 8x8 digits
(upsampled to 28x28), with a plain ``transformers.Trainer``; it then puts a fresh 10-class head on
it and fine-tunes it federatedly on Fashion-MNIST (Debian's ``dataset-fashion-mnist``), split
non-IID over 10 clients by a Dirichlet(0.5) draw over the labels (recipes/vit_pretrain.py holds
the pretraining, recipes/vit_data.py the data). It prints the global model's accuracy every round
and writes the merged model, ``results.json``, ``confusion_matrix.png`` and ``accuracy_by_round.png``
(docs/recipes.md says what a run takes and reaches). On a machine whose cores are busy with other
work, ``OMP_NUM_THREADS=1`` avoids the thread oversubscription that slows small models down.

Arguments layer as command line > config file > the recipe's DEFAULTS > library defaults;
``--help`` shows the values a run uses. ``build`` returns a ``recipes.common.RecipeBuild``: this
recipe's ``main``, the Flower app (recipes/flower) and benchmarks/convergence.py all build through it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `recipes.*` under accelerate launch too

import fedsmooth_hf  # noqa: E402, F401  (first: its log filters, _quiet.py, precede transformers' `import peft`)

# isort: split
from transformers import TrainingArguments, default_data_collator, set_seed  # noqa: E402

from fedsmooth_hf import FederatedArguments, FedSmoothLoRAConfig  # noqa: E402
from recipes.classification import (  # noqa: E402
    LABEL,
    check_modules_to_save,
    compute_accuracy,
    round_printer,
    train_and_report,
)
from recipes.common import (  # noqa: E402
    IMAGE_CLASSIFICATION,
    RecipeBuild,
    output_dir_guard,
    parse_recipe_args,
    peft_start,
)
from recipes.vit_data import (  # noqa: E402
    OFFLINE_MAX_EVAL,
    OFFLINE_MAX_TRAIN,
    load_checkpoint,
    load_hub_data,
    load_offline_data,
)
from recipes.vit_pretrain import describe, offline_image_processor, offline_model  # noqa: E402


@dataclass
class VitArguments:
    """Which model and data the recipe uses (everything else: TrainingArguments / FederatedArguments)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Any HF image-classification checkpoint (hub id or local dir), e.g. "
                          "google/vit-base-patch16-224-in21k; its head is replaced by a fresh one. Default: "
                          "offline, a small ViT pretrained here on sklearn digits, fine-tuned on Fashion-MNIST."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A `datasets` image dataset (hub name or local path for load_dataset), or "
                          "'imagefolder' with --train_dir. Default: offline Fashion-MNIST."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of dataset_name."})
    train_dir: str | None = field(
        default=None, metadata={"help": "Image folder (one sub-folder per class) for dataset_name=imagefolder."}
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class labels."})
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": f"Use at most this many training images (offline default: {OFFLINE_MAX_TRAIN})."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": f"Use at most this many eval images (offline default: {OFFLINE_MAX_EVAL})."},
    )
    pretrain_steps: int = field(
        default=3000,
        metadata={"help": "Offline default only: steps of source-task pretraining (sklearn digits) of the small ViT."},
    )
    pretrain_learning_rate: float = field(
        default=2e-3, metadata={"help": "Offline default only: learning rate of the pretraining."}
    )
    pretrain_batch_size: int = field(default=64, metadata={"help": "Offline default only: pretraining batch size."})
    vit_hidden_size: int = field(
        default=64, metadata={"help": "Offline default only: hidden size of the small ViT (MLP width: 2x)."}
    )
    vit_layers: int = field(default=4, metadata={"help": "Offline default only: transformer layers of the small ViT."})
    vit_heads: int = field(default=4, metadata={"help": "Offline default only: attention heads of the small ViT."})
    patch_size: int = field(
        default=7, metadata={"help": "Offline default only: patch size of the small ViT (must divide 28)."}
    )
    plot_dir: str | None = field(
        default=None, metadata={"help": "Where the PNG plots go (default: output_dir)."}
    )


# The recipe's own defaults: a config file and the command line override them.
DEFAULTS = {
    "output_dir": "outputs/vit_fashion_mnist",
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "learning_rate": 5e-3,
    "lr_scheduler_type": "constant",
    "logging_steps": 5,
    "report_to": "none",
    "save_strategy": "no",
    "strategy": "fedsmoothlora",
    "num_clients": 10,
    "num_rounds": 20,
    "local_steps": 10,
    "round_lr_schedule": "cosine",
    "lora_r": 8,
    "lora_alpha": 16,
    "ga_samples": 32,
    "ga_batch_size": 32,
    "modules_to_save": ["classifier"],
    "partition": "dirichlet",
    "dirichlet_alpha": 0.5,
    "partition_column": LABEL,
}


def parse_args(argv: list[str] | None = None):
    """Parses `[config.yaml|.json] [--flag value ...]` (`sys.argv` by default).

    Returns:
        `(TrainingArguments, FederatedArguments, FedSmoothLoRAConfig, VitArguments)`.
    """
    return parse_recipe_args(VitArguments, DEFAULTS, sys.argv[1:] if argv is None else argv)


def build(args: TrainingArguments, fed_args: FederatedArguments, method: FedSmoothLoRAConfig | None,
          va: VitArguments, data: tuple | None = None, body: dict | None = None) -> RecipeBuild:
    """Builds the run: the classifier with a fresh head, its label-encoded data, collator and round printer.

    Args:
        args (`TrainingArguments`): The run's training arguments (`seed` seeds the fresh head).
        fed_args (`FederatedArguments`): The federation's arguments.
        method (`FedSmoothLoRAConfig`, *optional*): FedSmoothLoRA's options, carried by the LoRA config.
        va (`VitArguments`): Which model and data.
        data (`tuple`, *optional*): The offline default's `(train, evals, class_names, source)` from
            `recipes.vit_data.load_offline_data`, for a caller that reuses one copy over many runs.
        body (`dict`, *optional*): The offline default's pretrained body (`vit_pretrain.head_free_weights`),
            for a caller that pretrained it once; by default it is pretrained here.

    Returns:
        [`RecipeBuild`] with `class_names`, `data_source` and `pretraining` (the offline default's).
    """
    set_seed(args.seed)  # the fresh head of a checkpoint is initialised before Trainer would seed
    main_proc = args.process_index == 0
    pretraining = None
    if va.model_name_or_path is None:
        train_ds, eval_ds, class_names, source = data or load_offline_data(va, args.seed, main_proc)
        model, pretraining = offline_model(va, args, class_names, main_proc, body=body)
        processor, model_name = offline_image_processor(), describe(va)
    else:
        train_ds, eval_ds, class_names, source = data or load_hub_data(va, args.seed)
        model, processor, train_ds, eval_ds = load_checkpoint(va, train_ds, eval_ds, class_names)
        # the transform needs the raw image column, which Trainer would otherwise drop before it runs
        args.remove_unused_columns = False
        model_name = va.model_name_or_path
        if main_proc:
            print(f"[recipe] model {model_name}; data {source} ({len(train_ds)} train / {len(eval_ds)} eval "
                  f"images, {len(class_names)} classes)", flush=True)
    check_modules_to_save(model, fed_args)
    if fed_args.partition_column == va.label_column:
        fed_args.partition_column = LABEL  # the label column was renamed
    kwargs = dict(model=model, args=args, fed_args=fed_args, **peft_start(fed_args, method, va, train_ds, args.seed),
                  eval_dataset=eval_ds, data_collator=default_data_collator,
                  processing_class=processor, compute_metrics=compute_accuracy, callbacks=[round_printer()])
    return RecipeBuild(trainer_kwargs=kwargs, task=IMAGE_CLASSIFICATION, model_name=model_name, data_source=source,
                       class_names=class_names, pretraining=pretraining)


def main(argv: list[str] | None = None) -> dict:
    """Runs the recipe on `[config.yaml|.json] [--flag value ...]` (`sys.argv` by default).

    Returns:
        `dict`: the content of `results.json`.
    """
    args, fed_args, method, va = parse_args(argv)
    t0 = time.perf_counter()
    with output_dir_guard(args.output_dir):
        run = build(args, fed_args, method, va)
        return train_and_report(run.make_trainer(), run, va, t0, plot_dir=va.plot_dir, unit="images")


if __name__ == "__main__":
    main()
