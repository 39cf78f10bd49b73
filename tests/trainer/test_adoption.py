"""Three-line adoption: an upstream-style Trainer script federates by changing three lines."""

import difflib
import json
import runpy
from pathlib import Path

import pytest
from transformers import TrainingArguments

from fedsmooth_hf import FederatedArguments, FederatedTrainer, FederatedTrainingArguments

PLAIN = Path(__file__).resolve().parents[1] / "scripts" / "plain_trainer.py"
# what a user changes in an upstream Trainer script: one import added after transformers', two lines replaced
IMPORT_AFTER = "from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments"
IMPORT = "from fedsmooth_hf import FederatedTrainer, FederatedTrainingArguments"
REPLACED = {
    "    parser = HfArgumentParser((DataTrainingArguments, TrainingArguments))":
    "    parser = HfArgumentParser((DataTrainingArguments, FederatedTrainingArguments))",
    "    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,":
    "    trainer = FederatedTrainer(model=model, args=training_args, train_dataset=train_dataset, "
    "eval_dataset=eval_dataset,",
}
COMMON = ["--per_device_train_batch_size", "8", "--learning_rate", "5e-3", "--report_to", "none", "--use_cpu",
          "--disable_tqdm", "true", "--save_strategy", "no", "--logging_steps", "50"]


def _federate(plain: list[str]) -> list[str]:
    """The plain script with the three edits; each must match exactly one line."""
    lines = list(plain)

    def at(wanted):
        (i,) = [i for i, line in enumerate(lines) if line == wanted]
        return i

    lines.insert(at(IMPORT_AFTER) + 1, IMPORT)
    for before, after in REPLACED.items():
        lines[at(before)] = after
    return lines


@pytest.fixture
def federated_script(tmp_path):
    path = tmp_path / "federated_trainer.py"
    path.write_text("\n".join(_federate(PLAIN.read_text().splitlines())) + "\n")
    return path


def test_federated_script_differs_from_the_plain_one_in_exactly_three_lines(federated_script):
    plain = PLAIN.read_text().splitlines()
    federated = federated_script.read_text().splitlines()
    diff = [line for line in difflib.ndiff(plain, federated) if line[:2] in ("- ", "+ ")]
    assert [line for line in diff if line.startswith("+ ")] == [
        "+ from fedsmooth_hf import FederatedTrainer, FederatedTrainingArguments",
        "+     parser = HfArgumentParser((DataTrainingArguments, FederatedTrainingArguments))",
        "+     trainer = FederatedTrainer(model=model, args=training_args, train_dataset=train_dataset, "
        "eval_dataset=eval_dataset,",
    ]
    assert [line for line in diff if line.startswith("- ")] == [
        "-     parser = HfArgumentParser((DataTrainingArguments, TrainingArguments))",
        "-     trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, "
        "eval_dataset=eval_dataset,",
    ]


def test_both_scripts_train_and_the_federated_one_runs_rounds(tmp_path, federated_script):
    plain_trainer, plain_metrics = runpy.run_path(str(PLAIN))["main"](
        ["--output_dir", str(tmp_path / "plain"), "--max_steps", "2", *COMMON])
    assert type(plain_trainer).__name__ == "Trainer" and "eval_accuracy" in plain_metrics

    out = tmp_path / "federated"
    trainer, metrics = runpy.run_path(str(federated_script))["main"](
        ["--output_dir", str(out), "--num_clients", "2", "--num_rounds", "2", "--local_steps", "3", "--lora_r", "2",
         "--lora_alpha", "4", "--ga_samples", "8", *COMMON])
    assert isinstance(trainer, FederatedTrainer)
    assert [r["round"] for r in trainer.round_history] == [0, 1, 2]
    assert all("eval_accuracy" in r for r in trainer.round_history), "compute_metrics runs every round"
    assert 0 <= metrics["eval_accuracy"] <= 1
    card = (out / "README.md").read_text()
    assert "federated-learning" in card and "| num_clients | 2 |" in card and "pipeline_tag: text-generation" in card
    assert json.loads((out / "federated_history.json").read_text())["fed_args"]["num_rounds"] == 2


def test_federated_training_arguments_carry_every_federated_field():
    args = FederatedTrainingArguments(output_dir="unused", num_clients=3, local_steps=7, report_to="none")
    assert args.federated_arguments() == FederatedArguments(num_clients=3, local_steps=7)
    assert "hf_secret" not in repr(FederatedTrainingArguments(output_dir="unused", hub_token="hf_secret"))
    with pytest.raises(ValueError, match="FederatedTrainingArguments.num_clients=0: must be >= 1"):
        FederatedTrainingArguments(output_dir="unused", num_clients=0, report_to="none")


def test_federated_fields_given_twice_are_an_error(tiny_llama):
    from support.tiny import make_counting_dataset

    args = FederatedTrainingArguments(output_dir="unused", num_clients=2, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="federated fields would be given twice"):
        FederatedTrainer(model=tiny_llama, args=args, fed_args=FederatedArguments(num_clients=2),
                         train_dataset=make_counting_dataset(16))
    assert not isinstance(TrainingArguments(output_dir="unused"), FederatedTrainingArguments)
