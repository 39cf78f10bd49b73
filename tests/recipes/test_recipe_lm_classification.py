"""recipes/lm_classification.py: a new classification head on a pretrained LM, federated, on a tiny Llama.

The tiny Llama is a causal-LM checkpoint with SmolLM2's tokenizer, as a user's own would be: the
recipe puts a fresh sequence-classification head on it. Nothing is downloaded.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from support.recipes import ROOT, help_defaults, parsed, run_script
from support.tiny import save_tiny_llama_checkpoint

sys.path.insert(0, str(ROOT))
from recipes import lm_classification as recipe  # noqa: E402
from recipes.common import SEQUENCE_CLASSIFICATION, RecipeBuild  # noqa: E402

WORDS = {"good": ["great", "wonderful", "excellent", "lovely"], "bad": ["awful", "terrible", "horrid", "dreadful"],
         "meh": ["average", "okay", "so-so", "middling"]}
TINY = ["--num_clients", "2", "--partition", "iid", "--ga_samples", "4", "--ga_batch_size", "4",
        "--per_device_train_batch_size", "8", "--max_length", "16", "--disable_tqdm", "true", "--use_cpu", "true"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny_llama_ckpt"))


def _reviews(path: Path, rows: int = 90) -> Path:
    """A user's own data: review texts (column `review`) whose label (column `stars`) a keyword gives away."""
    rng = np.random.default_rng(0)
    labels = list(WORDS)
    lines = []
    for i in range(rows):
        label = labels[i % 3]
        text = f"the film was {rng.choice(WORDS[label])} and the food {rng.choice(WORDS[label])}"
        lines.append(json.dumps({"review": text, "stars": label, "id": i}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_help_shows_the_recipe_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        recipe.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    flags = ("num_clients", "num_rounds", "local_steps", "learning_rate", "partition", "dirichlet_alpha",
             "partition_column", "modules_to_save", "target_modules", "ga_samples", "zeta_mode", "max_length",
             "text_column", "label_column")
    assert help_defaults(text, flags) == {
        "num_clients": "10", "num_rounds": "8", "local_steps": "4", "learning_rate": "0.002", "partition": "dirichlet",
        "dirichlet_alpha": "0.1", "partition_column": "label", "modules_to_save": "['score']",
        "target_modules": "['q_proj', 'v_proj']", "ga_samples": "16", "zeta_mode": "auto", "max_length": "64",
        "text_column": "text", "label_column": "label"}


def test_config_file_equals_flags_and_flags_override_it(tmp_path):
    values = {"output_dir": str(tmp_path / "o"), "num_clients": 4, "learning_rate": "1e-3", "categories": "a,b",
              "backbone_layers": 2, "zeta_mode": "constant", "modules_to_save": ["score"]}
    tokens = [t for k, v in values.items() for t in (f"--{k}", *(v if isinstance(v, list) else [str(v)]))]
    (tmp_path / "c.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    assert parsed(*recipe.parse_args([str(tmp_path / "c.yaml")])) == parsed(*recipe.parse_args(tokens))
    args, fed, method, la = recipe.parse_args([str(tmp_path / "c.yaml"), "--num_rounds", "3"])
    assert (fed.num_rounds, fed.num_clients, args.learning_rate) == (3, 4, 1e-3)
    assert (la.categories, la.backbone_layers, method.zeta_mode, method.ga_samples) == ("a,b", 2, "constant", 16)


def test_load_report_explains_only_a_new_head_and_left_out_layers():
    explained = {"missing_keys": ["score.weight"], "mismatched_keys": [("score.weight", (3, 8), (10, 8))],
                 "unexpected_keys": ["model.layers.6.mlp.up_proj.weight", "lm_head.weight"]}
    assert recipe.unexplained_load_keys(explained, "model", layers=6) == []
    # with all layers kept, a layer the model does not have is a real mismatch, as are base keys missing
    assert recipe.unexplained_load_keys(explained, "model", layers=0) == ["model.layers.6.mlp.up_proj.weight"]
    odd = {"missing_keys": ["score.weight", "model.norm.weight"], "unexpected_keys": ["model.layers.3.x.weight"],
           "mismatched_keys": [("model.embed_tokens.weight", (5, 8), (6, 8))]}
    assert recipe.unexplained_load_keys(odd, "model", layers=6) == [
        "model.norm.weight", "model.layers.3.x.weight", "model.embed_tokens.weight"]


def test_offline_wordnet_data_through_build_is_label_skewed_over_clients(ckpt, tmp_path, capfd):
    """The offline default's data (WordNet glosses of ten categories) on the tiny model, Dirichlet(0.1) clients."""
    from recipes.offline_assets import load_wordnet_instructions

    args, fed, method, la = recipe.parse_args(["--model_name_or_path", str(ckpt), "--output_dir", str(tmp_path / "o"),
                                               "--max_length", "16", "--backbone_layers", "1", "--use_cpu", "true"])
    run = recipe.build(args, fed, method, la)
    out, err = capfd.readouterr()  # transformers' load report (every left-out key) is one line of ours instead
    assert "LOAD REPORT" not in err and "UNEXPECTED" not in err
    assert "[recipe] new classification head score initialized; decoder layers 1+ of the checkpoint left out" in out
    assert isinstance(run, RecipeBuild) and run.task == SEQUENCE_CLASSIFICATION
    assert run.class_names == recipe.OFFLINE_CATEGORIES
    assert run.data_source == "WordNet word + gloss -> 10 lexicographer categories"
    categories = load_wordnet_instructions("train")["category"]
    assert run.describe()["train"] == sum(c in recipe.OFFLINE_CATEGORIES for c in categories)
    model = run.trainer_kwargs["model"]
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1  # --backbone_layers 1 of 2
    assert model.config.id2label[0] == "noun.animal" and model.score.out_features == 10
    assert run.model_name == f"{ckpt} (first 1 layers) + new classification head"
    first = run.trainer_kwargs["train_dataset"][0]
    tokenizer = run.trainer_kwargs["processing_class"]
    word, _, gloss = tokenizer.decode(first["input_ids"]).partition(": ")
    assert word and gloss and len(first["input_ids"]) <= 16  # "word: gloss", truncated to --max_length

    trainer = run.make_trainer()
    assert len(trainer.client_datasets) == 10
    shares = []
    for client in trainer.client_datasets:
        counts = np.bincount(client["label"], minlength=10)
        shares.append(counts.max() / counts.sum())
    # label skew: a typical client is dominated by one category, where the whole data is balanced (~1/10 each)
    assert float(np.median(shares)) > 0.5
    assert trainer.strategy.config.ga_samples == 16 and trainer.lora_rank == 8
    assert {n.rsplit(".", 1)[-1] for n in trainer.layers} == {"q_proj", "v_proj"}


def test_unknown_category_is_an_error_naming_the_flag(ckpt, tmp_path):
    args, fed, method, la = recipe.parse_args(["--model_name_or_path", str(ckpt), "--output_dir", str(tmp_path / "o"),
                                               "--categories", "noun.animal,noun.unicorn"])
    with pytest.raises(ValueError, match=r"--categories: \['noun.unicorn'\] are not labels"):
        recipe.build(args, fed, method, la)


def test_own_data_end_to_end_under_accelerate_launch(ckpt, tmp_path):
    data, out = _reviews(tmp_path / "reviews.jsonl"), tmp_path / "run"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    stdout = run_script([accelerate, "launch", "--num_processes", "1", "--cpu", "recipes/lm_classification.py",
                         "--model_name_or_path", str(ckpt), "--data_files", str(data), "--text_column", "review",
                         "--label_column", "stars", "--output_dir", str(out), "--num_rounds", "3", "--local_steps",
                         "6", "--learning_rate", "1e-2", *TINY], threads=1)
    assert "[round 3] eval_accuracy=" in stdout and "final accuracy" in stdout

    results = json.loads((out / "results.json").read_text())
    assert results["class_names"] == ["bad", "good", "meh"]  # sorted distinct labels of the user's column
    assert (results["num_train"], results["num_eval"]) == (81, 9)  # 10% held out
    rounds = results["accuracy_by_round"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert results["final_accuracy"] == pytest.approx(rounds[-1]["eval_accuracy"])
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]  # the keyword task is learnt
    assert np.asarray(results["confusion_matrix"]).sum() == 9
    assert results["settings"]["federated"]["modules_to_save"] == ["score"]
    assert results["settings"]["recipe"]["label_column"] == "stars"
    assert results["settings"]["method"]["ga_samples"] == 4  # FedSmoothLoRA's options, as the run used them
    for png in ("confusion_matrix.png", "accuracy_by_round.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any("lora" in k for k in model.state_dict())
    assert model.config.num_labels == 3 and model.config.id2label[1] == "good"
    AutoTokenizer.from_pretrained(out)
