"""`--init_lora_weights` and `--server_calibration_samples`: every recipe takes them, the NLG recipe uses them.

The evidence benchmark (benchmarks/evidence_nlg.py) runs FedIT from peft's LoRA-GA through exactly
`recipes.nlg_llama.parse_args` + `build`; that path is run here on a tiny Llama.
"""

import importlib

import pytest
import torch
from support.recipes import ROOT  # noqa: F401  (puts the repository root on sys.path)
from support.tiny import save_tiny_llama_checkpoint

import recipes.nlg_llama as nlg
from benchmarks.evidence_nlg import CONFIGS, SETTING
from fedsmooth_hf import FederatedTrainer

RECIPES = ("nlg_llama", "vit_classification", "lm_classification")
TINY = {"max_train_samples": 160, "max_eval_samples": 4, "num_rounds": 1, "local_steps": 1, "clients_per_round": 2,
        "eval_rounds": 0, "disable_tqdm": True, "use_cpu": True}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny_llama_ckpt"))


def _benchmark_argv(ckpt, out, **changes) -> list[str]:
    """The benchmark's own command line for `fedit+lora_ga` (its SETTING and CONFIGS entry), made tiny."""
    options = {k: v for k, v in {**SETTING, **CONFIGS["fedit+lora_ga"]}.items() if k != "rouge_new_tokens"}
    argv = []
    for key, value in {**options, **TINY, "model_name_or_path": ckpt, "seed": 1, "output_dir": out, **changes}.items():
        argv += [f"--{key}", *str(value).split(",")] if key == "target_modules" else [f"--{key}", str(value)]
    return argv


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_takes_the_init_flags_with_peft_defaults(recipe, tmp_path):
    module = importlib.import_module(f"recipes.{recipe}")
    _, _, _, recipe_args = module.parse_args(["--output_dir", str(tmp_path)])
    assert recipe_args.init_lora_weights == "true" and recipe_args.server_calibration_samples == 0
    _, fed, method, recipe_args = module.parse_args(["--output_dir", str(tmp_path), "--init_lora_weights", "pissa",
                                                     "--server_calibration_samples", "7"])
    assert recipe_args.init_value() == "pissa" and recipe_args.server_calibration_samples == 7
    from recipes.common import lora_config

    assert lora_config(fed, method, recipe_args).init_lora_weights == "pissa"
    assert lora_config(fed, method).init_lora_weights is True


def test_benchmark_lora_ga_command_line_calibrates_on_server_examples_only(ckpt, tmp_path):
    args, fed_args, method, md = nlg.parse_args(_benchmark_argv(ckpt, tmp_path / "out"))
    assert (fed_args.strategy, md.init_lora_weights, md.server_calibration_samples) == ("fedit", "lora_ga", 64)
    tokenizer = nlg.load_tokenizer(nlg.model_path(md))
    data = nlg.load_data(md, tokenizer, 0, keep=("category",))
    built = nlg.build(args, fed_args, method, md, data=data)
    init_ds, train_ds = built.trainer_kwargs["init_dataset"], built.trainer_kwargs["train_dataset"]
    assert len(init_ds) == 64 and len(train_ds) == len(data[0]) - 64
    # taken out before the partition: the clients hold every other example, and none of the server's
    key = lambda row: (tuple(row["input_ids"]), row["category"])  # noqa: E731
    server = {key(r) for r in init_ds}
    trainer = FederatedTrainer(**built.trainer_kwargs)
    client_rows = [key(r) for ds in trainer.client_datasets for r in ds]
    assert len(client_rows) == len(train_ds) and not server & set(client_rows)
    assert trainer.model.peft_config["default"].init_lora_weights == "lora_ga"
    B, _ = next(iter(trainer.strategy.global_lora().values()))
    assert B.abs().sum() > 0, "the round-0 global adapter is LoRA-GA's, not a zero B"
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.round_history[-1]["train_loss"]))


def test_lora_ga_without_server_samples_is_an_error_naming_the_flag(ckpt, tmp_path):
    args, fed_args, method, md = nlg.parse_args(_benchmark_argv(ckpt, tmp_path / "out",
                                                                server_calibration_samples=0))
    tokenizer = nlg.load_tokenizer(nlg.model_path(md))
    data = nlg.load_data(md, tokenizer, 0, keep=("category",))
    with pytest.raises(ValueError, match="--server_calibration_samples"):
        nlg.build(args, fed_args, method, md, data=data)


def test_peft_start_sets_server_examples_apart_in_every_recipe(tmp_path):
    import datasets

    from recipes.common import peft_start

    module = importlib.import_module("recipes.vit_classification")
    _, fed, method, va = module.parse_args(["--output_dir", str(tmp_path), "--strategy", "fedit",
                                            "--init_lora_weights", "olora", "--server_calibration_samples", "3"])
    train = datasets.Dataset.from_dict({"x": list(range(10))})
    start = peft_start(fed, method, va, train, seed=0)
    rest, server = list(start["train_dataset"]["x"]), list(start["init_dataset"]["x"])
    assert len(server) == 3 and sorted(rest + server) == list(range(10)) and rest == sorted(rest)
    assert start["peft_config"].init_lora_weights == "olora"
    va.server_calibration_samples = 0
    assert "init_dataset" not in peft_start(fed, method, va, train, seed=0)
