"""Generation quality beside the loss: ROUGE-L of the global model's greedy answers against the references.

`rouge_l` is the sentence-level ROUGE-L F-measure (Lin, 2004: longest common subsequence of the
lower-cased word tokens, F with beta = 1), the figure the ``rouge_score`` package reports as
``rougeL`` without stemming. It is written here because ``evaluate``'s ROUGE metric needs
``rouge_score``, which this machine cannot install; tests/bench checks it against a brute-force LCS.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased alphanumeric words (``rouge_score``'s default tokenizer, without stemming)."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programming, one row kept)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one prediction against one reference; 0 when either has no word."""
    p, r = tokenize(prediction), tokenize(reference)
    if not p or not r:
        return 0.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
                   batch_size: int = 16) -> list[str]:
    """The model's greedy continuations of ``prompts`` (left-padded batches), special tokens dropped."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # a decoder continues from the last position: pad on the left
    device = next(model.parameters()).device
    answers: list[str] = []
    try:
        was_training = model.training
        model.eval()
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            answers += [t.strip() for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                                   skip_special_tokens=True)]
        model.train(was_training)
    finally:
        tokenizer.padding_side = side
    return answers


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean sentence-level ROUGE-L F1 over pairs."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"mean_rouge_l: {len(predictions)} predictions for {len(references)} references")
    return sum(rouge_l(p, r) for p, r in zip(predictions, references)) / len(predictions)
