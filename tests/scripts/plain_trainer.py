"""A plain ``transformers.Trainer`` script, shaped like transformers' examples (run_clm.py).

``tests/trainer/test_adoption.py`` federates it by changing three lines (the import, the
arguments class, ``Trainer``), checks the line diff and runs both. Self-contained: a
tiny Llama built from a config and a generated counting task, so it runs offline.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


@dataclass
class DataTrainingArguments:
    num_examples: int = field(default=64, metadata={"help": "Training sequences to generate."})
    seq_len: int = field(default=12, metadata={"help": "Tokens per sequence."})


def counting_data(n: int, seq_len: int, vocab: int, seed: int) -> Dataset:
    """Sequences counting upward mod vocab: a task a tiny model learns in a few steps."""
    starts = np.random.default_rng(seed).integers(0, vocab, n)
    rows = [[int(s + i) % vocab for i in range(seq_len)] for s in starts]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def preprocess_logits_for_metrics(logits, labels):
    return logits.argmax(dim=-1)


def compute_metrics(eval_preds):
    """Next-token accuracy computed locally: ``evaluate.load`` needs the Hub."""
    preds, labels = eval_preds
    preds, labels = preds[:, :-1].reshape(-1), labels[:, 1:].reshape(-1)
    mask = labels != -100
    return {"accuracy": float((preds[mask] == labels[mask]).mean())}


def main(argv=None):
    parser = HfArgumentParser((DataTrainingArguments, TrainingArguments))
    data_args, training_args = parser.parse_args_into_dataclasses(argv)
    torch.manual_seed(training_args.seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    train_dataset = counting_data(data_args.num_examples, data_args.seq_len, config.vocab_size, seed=0)
    eval_dataset = counting_data(16, data_args.seq_len, config.vocab_size, seed=1)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess_logits_for_metrics)
    trainer.train()
    trainer.save_model()
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.create_model_card(tasks="text-generation", dataset="counting")
    return trainer, metrics


if __name__ == "__main__":
    main()
