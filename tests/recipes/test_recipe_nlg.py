"""recipes/nlg_llama.py end to end (tiny Llama with SmolLM2's tokenizer), fp32, QLoRA 4-bit and DeepSpeed ZeRO-2/3."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from support.recipes import ROOT, help_defaults, parsed, run_script
from support.tiny import save_tiny_llama_checkpoint
from transformers import AutoTokenizer, LlamaForCausalLM

sys.path.insert(0, str(ROOT))
from recipes.nlg_llama import ModelDataArguments, PadCollator, tokenize_dataset  # noqa: E402

TINY = ["--max_train_samples", "48", "--max_eval_samples", "8", "--num_clients", "2", "--clients_per_round", "2",
        "--num_rounds", "2", "--local_steps", "2", "--per_device_train_batch_size", "4", "--ga_samples", "8",
        "--ga_batch_size", "4", "--max_new_tokens", "4", "--max_length", "48", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny_llama_ckpt"))


def _run(cmd, timeout=600):
    return run_script(cmd, timeout=timeout)


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
        {"instruction": 'Define the word "cat".', "input": "", "output": "a small domesticated feline",
         "category": "a"},
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


# ---------------------------------------------------------------------- the newcomer's path (issue 16)
PLAYS = ["hamlet", "macbeth", "lear", "othello"]


def _own_jsonl(path: Path, rows: int = 40) -> Path:
    """A user's own instruction data with a column of theirs (``play``) to split the clients by."""
    lines = [json.dumps({"instruction": f'Quote line {i} of {PLAYS[i % 4]}.', "output": f"line {i} of the play",
                         "play": PLAYS[i % 4]}) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _tiny_own_data_args(ckpt, tmp_path) -> list[str]:
    return ["--model_name_or_path", str(ckpt), "--data_files", str(_own_jsonl(tmp_path / "plays.jsonl")),
            "--num_clients", "2", "--clients_per_round", "2", "--num_rounds", "1", "--local_steps", "1",
            "--per_device_train_batch_size", "4", "--ga_samples", "4", "--ga_batch_size", "4",
            "--max_new_tokens", "2", "--max_length", "64", "--disable_tqdm", "true"]


@pytest.mark.parametrize("partition", ["column", "dirichlet"])
def test_own_jsonl_split_by_a_column_of_the_users(ckpt, tmp_path, capsys, partition):
    from recipes.nlg_llama import main

    out = tmp_path / "run"
    results = main([*_tiny_own_data_args(ckpt, tmp_path), "--partition", partition, "--partition_column", "play",
                    "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert "top play" in printed, printed  # the per-client table, by the user's column
    assert [r["round"] for r in results["round_history"]] == [0, 1]
    assert (out / "results.json").is_file()


def test_build_returns_the_recipe_contract_with_the_method_options_in_the_lora_config(ckpt, tmp_path):
    from fedsmooth_hf import FederatedLoraConfig
    from recipes.common import CAUSAL_LM, RecipeBuild
    from recipes.nlg_llama import build, parse_args

    args, fed, method, md = parse_args([*_tiny_own_data_args(ckpt, tmp_path), "--output_dir", str(tmp_path / "o"),
                                        "--partition", "iid", "--zeta_mode", "cosine", "--min_zeta", "0.25"])
    run = build(args, fed, method, md)
    assert isinstance(run, RecipeBuild) and run.task == CAUSAL_LM and run.class_names is None
    assert run.eval_prompts == [md.generation_prompt] and run.model_name == str(ckpt)
    assert run.data_source.endswith("plays.jsonl") and run.args is args and run.fed_args is fed
    info = run.describe()
    assert info["train"] + info["eval"] == 40 and info["eval"] == 2  # 5% of the user's rows held out
    peft_config = run.trainer_kwargs["peft_config"]
    assert isinstance(peft_config, FederatedLoraConfig) and (peft_config.r, peft_config.lora_alpha) == (8, 16.0)
    assert run.method == method
    trainer = run.make_trainer()
    assert (trainer.strategy.config.zeta_mode, trainer.strategy.config.min_zeta) == ("cosine", 0.25)
    assert trainer.strategy.config.ga_samples == 4  # the flag, through the LoRA config


def test_help_shows_the_recipe_defaults(capsys):
    from recipes.nlg_llama import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    flags = ("num_clients", "clients_per_round", "ga_samples", "partition", "partition_column", "learning_rate",
             "max_eval_samples", "lora_alpha", "zeta_mode", "ga_estimator")
    assert help_defaults(text, flags) == {"num_clients": "8", "clients_per_round": "4", "ga_samples": "16",
                                          "partition": "column", "partition_column": "category",
                                          "learning_rate": "0.0005", "max_eval_samples": "64", "lora_alpha": "16",
                                          "zeta_mode": "auto", "ga_estimator": "sketch"}
    assert "5 percent of the training rows" in " ".join(text.split())  # --eval_files, no stray '%' format


def test_config_file_and_command_line_give_the_same_arguments(tmp_path):
    from recipes.nlg_llama import DEFAULTS, parse_args

    values = {"output_dir": str(tmp_path / "o"), "strategy": "fedit", "num_clients": 2, "lora_alpha": 32,
              "learning_rate": "1e-3", "target_modules": ["q_proj", "v_proj"], "bf16": False, "max_length": 40,
              "input_column": "context", "report_to": "none", "zeta_mode": "cosine", "min_zeta": 0.5}
    tokens = []
    for key, value in values.items():
        tokens += [f"--{key}", *(value if isinstance(value, list) else [str(value)])]
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps(values))
    from_command_line = parsed(*parse_args(tokens))
    assert parsed(*parse_args([str(yaml_file)])) == from_command_line
    assert parsed(*parse_args([str(json_file)])) == from_command_line
    args, fed, method, md = parse_args([str(yaml_file)])
    # the recipe's defaults lie under the file; the user's num_clients 2 caps the recipe's clients_per_round 4
    assert (method.ga_samples, md.max_eval_samples, args.learning_rate) == (DEFAULTS["ga_samples"], 64, 1e-3)
    assert fed.lora_alpha == 32.0 and fed.clients_per_round == 2 and fed.target_modules == ["q_proj", "v_proj"]
    # the command line overrides the file
    args, fed, method, md = parse_args([str(yaml_file), "--num_rounds", "7", "--learning_rate", "2e-3"])
    assert (fed.num_rounds, args.learning_rate, fed.strategy) == (7, 2e-3, "fedit")
    assert (method.zeta_mode, method.min_zeta) == ("cosine", 0.5)  # FedSmoothLoRAConfig's group, from the file
    (tmp_path / "bad.yaml").write_text("num_client: 2\n")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['num_client'\]"):
        parse_args([str(tmp_path / "bad.yaml")])


def test_resume_from_a_missing_checkpoint_is_an_error_and_leaves_no_output_dir(ckpt, tmp_path):
    from recipes.nlg_llama import main

    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint .*no_such_round"):
        main([*_tiny_own_data_args(ckpt, tmp_path), "--output_dir", str(out), "--partition", "iid",
              "--resume_from_checkpoint", str(tmp_path / "no_such_round")])
    # 'true' with no checkpoint in output_dir fails once the trainer exists: its output_dir goes again
    with pytest.raises(ValueError, match="no federated checkpoint"):
        main([*_tiny_own_data_args(ckpt, tmp_path), "--output_dir", str(out), "--partition", "iid",
              "--resume_from_checkpoint", "true"])
    assert not out.exists()


def test_malformed_jsonl_names_the_file_and_the_row(ckpt, tmp_path):
    from recipes.nlg_llama import main

    args = _tiny_own_data_args(ckpt, tmp_path)
    data = tmp_path / "plays.jsonl"
    lines = data.read_text().splitlines()
    lines[6] = lines[6][:-1]  # row 7 loses its closing brace
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"{re.escape(str(data))}: row 7 is not valid JSON"):
        main([*args, "--output_dir", str(out), "--partition", "iid"])
    assert not out.exists()


# ---------------------------------------------------------------------- every documented command line
SKIPPED_FLAGS = {"--deepspeed": 1, "--push_to_hub": 0, "--hub_model_id": 1}  # they reach out (DeepSpeed, the Hub)


def _documented_recipe_commands() -> list[tuple[str, list[str]]]:
    """(recipe, flags) of every `recipes/<recipe>.py ...` command line in the docs, README and Makefile."""
    import shlex

    texts = [p.read_text() for p in (*(ROOT / "docs").glob("*.md"), ROOT / "README.md", ROOT / "Makefile")]
    commands = []
    for text in texts:
        for line in re.sub(r"\\\n\s*", " ", text).splitlines():  # continuation lines joined
            match = re.search(r"recipes/(nlg_llama|vit_classification|lm_classification)\.py((?: [^#`]*)?)", line)
            if not match or ("accelerate launch" not in line and "python recipes/" not in line):
                continue
            tokens, flags = shlex.split(match.group(2)), []
            while tokens:
                token = tokens.pop(0)
                if token in SKIPPED_FLAGS:
                    del tokens[:SKIPPED_FLAGS[token]]
                elif flags or not token.endswith((".yaml", ".json")):  # a leading config file is not a flag
                    flags.append(token)
            commands.append((match.group(1), flags))
    return commands


RECIPE_ARGUMENTS = {"nlg_llama": "ModelDataArguments", "vit_classification": "VitArguments",
                    "lm_classification": "LmClassificationArguments"}


def test_every_documented_recipe_command_line_parses(tmp_path):
    """`...` in a command stands for more flags, or for an elided value after a flag that takes one."""
    import importlib

    from recipes.common import recipe_parser

    commands = _documented_recipe_commands()
    assert {recipe for recipe, _ in commands} == set(RECIPE_ARGUMENTS)
    assert ("nlg_llama", ["--save_rounds", "-1"]) in commands  # make demo
    for recipe, flags in commands:
        module = importlib.import_module(f"recipes.{recipe}")
        takes_value = {flag: action.nargs != "?" for action in
                       recipe_parser(getattr(module, RECIPE_ARGUMENTS[recipe]), {})._actions
                       for flag in action.option_strings}
        argv = []
        for token in flags:
            if token != "...":
                argv.append(token)
            elif argv and takes_value.get(argv[-1], False):
                argv.append("placeholder")  # `--model_name_or_path ...`
        if "--bf16" in argv and not torch.cuda.is_available():
            argv += ["--use_cpu", "true"]  # a GPU command: TrainingArguments refuses bf16 on a CPU-only machine
        args, fed, method, recipe_args = module.parse_args([*argv, "--output_dir", str(tmp_path / "o")])
        assert fed.strategy and method.ga_samples >= 1, (recipe, flags)
