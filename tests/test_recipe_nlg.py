"""recipes/nlg_llama.py end to end (tiny Llama with SmolLM2's tokenizer), fp32, QLoRA 4-bit and DeepSpeed ZeRO-2/3."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama_checkpoint
from transformers import AutoTokenizer, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from recipes.nlg_llama import ModelDataArguments, PadCollator, tokenize_dataset  # noqa: E402

TINY = ["--max_train_samples", "48", "--max_eval_samples", "8", "--num_clients", "2", "--clients_per_round", "2",
        "--num_rounds", "2", "--local_steps", "2", "--per_device_train_batch_size", "4", "--ga_samples", "8",
        "--ga_batch_size", "4", "--max_new_tokens", "4", "--max_length", "48", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny_llama_ckpt"))


def _run(cmd, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _check_outputs(out_dir, rounds=2):
    results = json.loads((out_dir / "results.json").read_text())
    history = results["round_history"]
    assert [r["round"] for r in history] == list(range(rounds + 1))
    assert all("eval_loss" in r for r in history)
    model = LlamaForCausalLM.from_pretrained(out_dir)
    assert not any("lora" in k for k in model.state_dict())
    AutoTokenizer.from_pretrained(out_dir)
    return history


def test_prompt_is_masked_and_padding_never_counts(ckpt):
    import datasets

    tok = AutoTokenizer.from_pretrained(ckpt)
    md = ModelDataArguments()
    ds = datasets.Dataset.from_list([
        {"instruction": 'Define the word "cat".', "input": "", "output": "a small domesticated feline", "category": "a"},
        {"instruction": 'Define the word "run".', "input": "", "output": "move fast", "category": "b"},
    ])
    enc = tokenize_dataset(ds, tok, md)
    assert enc.column_names == ["category", "input_ids", "attention_mask", "labels"]
    row = enc[0]
    answer = tok("a small domesticated feline", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_prompt = len(row["input_ids"]) - len(answer)
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert row["labels"][n_prompt:] == answer == row["input_ids"][n_prompt:]
    batch = PadCollator(tok.pad_token_id)([enc[0], enc[1]])
    short = len(enc[1]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape
    assert (batch["labels"][1, short:] == -100).all() and (batch["attention_mask"][1, short:] == 0).all()
    assert (batch["input_ids"][1, short:] == tok.pad_token_id).all()


def test_recipe_end_to_end_fp32_and_reload(ckpt, tmp_path):
    out = _run([sys.executable, "recipes/nlg_llama.py", "--model_name_or_path", str(ckpt), "--output_dir",
                str(tmp_path / "run"), *TINY])
    assert "[round 2]" in out and "after training" in out
    history = _check_outputs(tmp_path / "run")
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]


def test_recipe_qlora_4bit(ckpt, tmp_path):
    _run([sys.executable, "recipes/nlg_llama.py", "--model_name_or_path", str(ckpt), "--output_dir",
          str(tmp_path / "q4"), "--load_in_4bit", *TINY])
    _check_outputs(tmp_path / "q4")
    saved = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert "quantization_config" not in saved, "the merged export is a dense model"


@pytest.mark.parametrize("stage", [2, 3])
def test_recipe_deepspeed(ckpt, tmp_path, stage):
    accelerate = str(Path(sys.executable).parent / "accelerate")
    _run([accelerate, "launch", "--num_processes", "1", "--use_deepspeed", "--zero_stage", str(stage),
          "recipes/nlg_llama.py", "--model_name_or_path", str(ckpt), "--output_dir", str(tmp_path / "ds"),
          "--deepspeed", f"recipes/configs/zero{stage}.json", *TINY])
    history = _check_outputs(tmp_path / "ds")
    assert history[-1]["eval_loss"] < history[0]["eval_loss"], f"ZeRO-{stage} local rounds must actually train"


def test_help_and_yaml_config(ckpt, tmp_path):
    out = _run([sys.executable, "recipes/nlg_llama.py", "--help"])
    for flag in ("--strategy", "--load_in_4bit", "--data_files", "--learning_rate", "--num_rounds"):
        assert flag in out
    config = tmp_path / "run.yaml"
    config.write_text("\n".join([
        f"model_name_or_path: {ckpt}", f"output_dir: {tmp_path / 'yaml_run'}", "strategy: fedit",
        "num_clients: 2", "num_rounds: 1", "local_steps: 1", "max_train_samples: 16", "max_eval_samples: 4",
        "partition: iid", "per_device_train_batch_size: 4", "max_new_tokens: 2", "report_to: none",
        "disable_tqdm: true", "",
    ]))
    _run([sys.executable, "recipes/nlg_llama.py", str(config)])
    results = json.loads((tmp_path / "yaml_run" / "results.json").read_text())
    assert results["strategy"] == "fedit"
    assert torch.isfinite(torch.tensor(results["round_history"][-1]["eval_loss"]))
