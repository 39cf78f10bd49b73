"""Tiny models and data: real HF architectures built from configs, so no test touches the Hub."""

from __future__ import annotations

import torch


def make_tiny_llama(seed: int = 0, vocab_size: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def make_tiny_vit(seed: int = 0, num_labels: int = 4):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config).eval()


def make_counting_dataset(n: int, vocab_size: int = 64, seq_len: int = 12, seed: int = 0, with_category: bool = True):
    """A learnable causal-LM task: each sequence counts upward mod vocab from a random start.

    ``category`` (start token mod 4) gives a natural non-IID split for column partitions.
    """
    import datasets

    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab_size, (n,), generator=gen)
    rows = {"input_ids": [], "labels": []}
    if with_category:
        rows["category"] = []
    for s in starts.tolist():
        ids = [(s + i) % vocab_size for i in range(seq_len)]
        rows["input_ids"].append(ids)
        rows["labels"].append(ids)
        if with_category:
            rows["category"].append(f"c{s % 4}")
    return datasets.Dataset.from_dict(rows)


def save_tiny_llama_checkpoint(path, vocab_from_smollm2: bool = True):
    """A tiny Llama saved with SmolLM2's real tokenizer: what a user's checkpoint dir looks like."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `recipes` is not installed
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from recipes.offline_assets import smollm2_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    torch.manual_seed(0)
    # widths are multiples of 64: bitsandbytes 4-bit on CPU quantizes in blocks of 64 inputs
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
