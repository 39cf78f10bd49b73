"""ROUGE-L against a brute-force reference, and batched greedy answers against one-by-one generation."""

import itertools
import random
import sys
from pathlib import Path

import pytest
import torch
from support.tiny import save_tiny_llama_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `benchmarks` is not installed
from benchmarks.generation_quality import greedy_answers, lcs_length, mean_rouge_l, rouge_l, tokenize  # noqa: E402


def brute_force_lcs(a, b) -> int:
    """The longest subsequence of ``a`` (tried from the longest down) that is also a subsequence of ``b``."""
    def is_subsequence(sub, seq):
        it = iter(seq)
        return all(x in it for x in sub)

    for k in range(len(a), 0, -1):
        if any(is_subsequence(c, b) for c in itertools.combinations(a, k)):
            return k
    return 0


def test_lcs_matches_brute_force_on_random_words():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        assert lcs_length(a, b) == brute_force_lcs(a, b), (a, b)


def test_rouge_l_is_the_lcs_f_measure():
    # prediction 6 words, reference 4, LCS "the cat on mat" = 4: P = 4/6, R = 1, F = 0.8
    assert rouge_l("The cat sat on the mat.", "the cat on mat") == pytest.approx(0.8)
    assert rouge_l("identical words here", "Identical, words here!") == pytest.approx(1.0)
    assert rouge_l("nothing shared", "other words") == 0.0
    assert rouge_l("", "reference") == 0.0
    assert tokenize("A dog's 2 bones") == ["a", "dog", "s", "2", "bones"]


def test_mean_rouge_l_rejects_mismatched_lists():
    assert mean_rouge_l(["a b", "c"], ["a b", "d"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        mean_rouge_l(["a", "b"], ["a"])


def test_batched_greedy_answers_equal_one_by_one(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_llama_checkpoint(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    side = tokenizer.padding_side
    model.train()  # dropout would make "greedy" random: generation must switch to eval and back
    prompts = ["Define the word cat.", "Define a long and winding word, please.", "Hi"]
    batched = greedy_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    alone = [greedy_answers(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone  # left padding keeps every prompt's continuation its own
    assert tokenizer.padding_side == side and model.training
