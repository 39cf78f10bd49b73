"""recipes/vit_classification.py end to end: offline default (tiny), --help, config files, any checkpoint."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support.recipes import parsed

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipes/vit_classification.py"
TINY = ["--max_train_samples", "120", "--max_eval_samples", "40", "--pretrain_steps", "5", "--num_clients", "3",
        "--num_rounds", "2", "--local_steps", "2", "--vit_hidden_size", "32", "--vit_layers", "1",
        "--ga_samples", "8", "--disable_tqdm", "true"]


def _run(args, timeout=180):
    # one thread: tiny models gain nothing from two, and a busy second core would stall them
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, RECIPE, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _check_outputs(out: Path, num_rounds: int, num_classes: int) -> dict:
    assert (out / "confusion_matrix.png").stat().st_size > 0
    assert (out / "accuracy_by_round.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    rounds = [r for r in results["accuracy_by_round"] if r["round"] >= 1]
    assert [r["round"] for r in rounds] == list(range(1, num_rounds + 1))
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in rounds)
    assert 0.0 <= results["final_accuracy"] <= 1.0
    assert results["final_accuracy"] == pytest.approx(rounds[-1]["eval_accuracy"])
    assert np.asarray(results["confusion_matrix"]).shape == (num_classes, num_classes)
    return results


def test_offline_default_end_to_end(tmp_path):
    proc = _run([*TINY, "--output_dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "No pretrained ViT is available offline: pretraining a small ViT on sklearn digits" in proc.stdout
    assert "[round 2] eval_accuracy=" in proc.stdout
    results = _check_outputs(tmp_path, num_rounds=2, num_classes=10)
    assert results["data_source"] in ("fashion-mnist", "sklearn-digits")
    assert results["settings"]["federated"]["modules_to_save"] == ["classifier"]
    assert results["settings"]["federated"]["partition"] == "dirichlet"

    from transformers import AutoImageProcessor, ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert not any("lora" in k for k in model.state_dict())
    with torch.no_grad():
        logits = model(pixel_values=torch.rand(3, 1, 28, 28)).logits
    assert logits.shape == (3, 10)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8), mode="L")
    assert tuple(processor(image, return_tensors="pt")["pixel_values"].shape) == (1, 1, 28, 28)


def test_help_lists_all_argument_groups():
    proc = _run(["--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for flag in ("--strategy", "--pretrain_steps", "--learning_rate", "--model_name_or_path", "--num_clients"):
        assert flag in proc.stdout


def _recipe():
    sys.path.insert(0, str(ROOT))
    from recipes import vit_classification

    return vit_classification


def test_defaults_are_overridable_from_the_command_line_and_config_files(tmp_path):
    recipe = _recipe()  # importing parses nothing
    args, fed, method, va = recipe.parse_args([])
    assert args.output_dir.endswith("vit_fashion_mnist") and args.report_to == []
    assert fed.modules_to_save == ["classifier"] and fed.partition == "dirichlet" and va.model_name_or_path is None
    assert (method.ga_samples, method.ga_batch_size) == (32, 32)  # the recipe's defaults of the method's options
    args, fed, method, va = recipe.parse_args(["--learning_rate", "1e-3", "--strategy", "fedit", "--patch_size", "4",
                                               "--gamma", "16"])
    assert args.learning_rate == 1e-3 and fed.strategy == "fedit" and va.patch_size == 4 and method.gamma == 16.0
    assert args.per_device_train_batch_size == recipe.DEFAULTS["per_device_train_batch_size"]

    cfg = {"output_dir": str(tmp_path / "o"), "strategy": "flexlora", "num_rounds": 3, "pretrain_steps": 7}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    (tmp_path / "c.yaml").write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    for name in ("c.json", "c.yaml"):
        args, fed, _, va = recipe.parse_args([str(tmp_path / name)])
        assert (args.output_dir, fed.strategy, fed.num_rounds, va.pretrain_steps) == (str(tmp_path / "o"), "flexlora",
                                                                                      3, 7)
        assert fed.modules_to_save == ["classifier"]  # recipe defaults still apply under the file


def _tiny_checkpoint_and_image_folder(root: Path):
    """A saved 3-channel ViT with its processor, and an image folder of 3 colour classes (train/test)."""
    import transformers
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 6)):
        for channel, name in enumerate(("red", "green", "blue")):
            folder = root / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((20, 24, 3)) * 80).astype(np.uint8)
                pixels[..., channel] += 150
                Image.fromarray(pixels).save(folder / f"{i}.png")
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=4, num_labels=5)  # head size != 3 classes
    ViTForImageClassification(config).save_pretrained(root / "ckpt")
    processor_cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    processor_cls(size={"height": 16, "width": 16}).save_pretrained(root / "ckpt")


def test_any_checkpoint_on_an_image_folder_from_a_json_config(tmp_path):
    recipe = _recipe()
    _tiny_checkpoint_and_image_folder(tmp_path)
    out = tmp_path / "out"
    cfg = {"model_name_or_path": str(tmp_path / "ckpt"), "dataset_name": "imagefolder",
           "train_dir": str(tmp_path / "images"), "output_dir": str(out), "num_clients": 2, "num_rounds": 2,
           "local_steps": 3, "lora_r": 4, "ga_samples": 8, "partition": "iid", "disable_tqdm": True,
           "use_cpu": True}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = recipe.main([str(tmp_path / "cfg.json")])
    finally:
        torch.set_num_threads(threads)
    _check_outputs(out, num_rounds=2, num_classes=3)
    assert results["class_names"] == ["blue", "green", "red"]

    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 3 and model.config.id2label[0] == "blue"
    assert AutoImageProcessor.from_pretrained(out).size == {"height": 16, "width": 16}


def test_build_returns_the_recipe_contract_for_any_checkpoint(tmp_path):
    recipe = _recipe()
    from recipes.common import IMAGE_CLASSIFICATION, RecipeBuild

    _tiny_checkpoint_and_image_folder(tmp_path)
    args, fed, method, va = recipe.parse_args([
        "--model_name_or_path", str(tmp_path / "ckpt"), "--dataset_name", "imagefolder", "--train_dir",
        str(tmp_path / "images"), "--output_dir", str(tmp_path / "out"), "--num_clients", "2", "--partition", "iid",
        "--use_cpu", "true", "--exact_round_matching", "true"])
    run = recipe.build(args, fed, method, va)
    assert isinstance(run, RecipeBuild) and run.task == IMAGE_CLASSIFICATION
    assert run.class_names == ["blue", "green", "red"] and run.pretraining is None
    assert run.model_name == str(tmp_path / "ckpt") and run.data_source == "imagefolder"
    assert run.describe() == {"model": str(tmp_path / "ckpt"), "data": run.data_source, "train": 48, "eval": 18}
    assert run.trainer_kwargs["model"].config.num_labels == 3 and run.method.exact_round_matching
    assert run.make_trainer().strategy.config.exact_round_matching


def test_help_shows_the_recipe_defaults_and_config_files_equal_flags(tmp_path, capsys):
    recipe = _recipe()
    with pytest.raises(SystemExit):
        recipe.parse_args(["--help"])
    entries = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    for flag, shown in (("num_clients", "10"), ("learning_rate", "0.005"), ("partition", "dirichlet"),
                        ("ga_samples", "32"), ("num_rounds", "20"), ("zeta", "1.0"), ("stale_round_matching",
                                                                                   "continuity")):
        assert re.search(rf"--{flag} {flag.upper()}\b.*?\(default: {re.escape(shown)}\)", entries), flag

    values = {"output_dir": str(tmp_path / "o"), "num_clients": 4, "lora_alpha": 8, "learning_rate": "1e-3",
              "modules_to_save": ["classifier"], "patch_size": 4, "use_cpu": True, "zeta": 0.5}
    tokens = [t for k, v in values.items() for t in (f"--{k}", *(v if isinstance(v, list) else [str(v)]))]
    (tmp_path / "c.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))

    assert parsed(*recipe.parse_args([str(tmp_path / "c.yaml")])) == parsed(*recipe.parse_args(tokens))
    args, fed, _, va = recipe.parse_args([str(tmp_path / "c.yaml"), "--num_rounds", "3"])
    assert (fed.num_rounds, fed.lora_alpha, args.learning_rate, va.patch_size) == (3, 8.0, 1e-3, 4)


def test_accuracy_through_evaluate_when_it_loads_locally_otherwise_said_once(monkeypatch, capsys):
    import sys
    import types

    import numpy as np
    from transformers import EvalPrediction

    import recipes.classification as vit  # the accuracy both classifier recipes use

    pred = EvalPrediction(predictions=np.eye(4), label_ids=np.array([0, 1, 2, 0]))
    vit.accuracy_metric.cache_clear()
    offline = types.ModuleType("evaluate")
    offline.load = lambda name: (_ for _ in ()).throw(FileNotFoundError(name))
    monkeypatch.setitem(sys.modules, "evaluate", offline)
    assert vit.compute_accuracy(pred) == {"accuracy": 0.75} and vit.compute_accuracy(pred) == {"accuracy": 0.75}
    assert capsys.readouterr().out.count("computed locally") == 1

    calls = []

    class Accuracy:
        def compute(self, predictions, references):
            calls.append((list(predictions), list(references)))
            return {"accuracy": 0.5}  # not the true value: proves the number came from evaluate

    vit.accuracy_metric.cache_clear()
    online = types.ModuleType("evaluate")
    online.load = lambda name: Accuracy()
    monkeypatch.setitem(sys.modules, "evaluate", online)
    assert vit.compute_accuracy(pred) == {"accuracy": 0.5}
    assert calls == [([0, 1, 2, 3], [0, 1, 2, 0])]
    vit.accuracy_metric.cache_clear()


def test_accuracy_plot_draws_the_clients_mean_and_worst_when_evaluated(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    import recipes.plots as vit  # the plots every recipe draws

    drawn = {}
    save = plt.Figure.savefig

    def spy(fig, path, **kw):
        drawn.update({line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()})
        return save(fig, path, **kw)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    history = [{"round": k, "eval_accuracy": 0.5 + k / 10, "client_eval_accuracy_mean": 0.4 + k / 10,
                "client_eval_accuracy_worst": 0.2 + k / 10} for k in range(3)]
    vit.plot_accuracy_by_round(history, 0.1, tmp_path / "acc.png", "t")
    assert (tmp_path / "acc.png").exists()
    for label, key in (("global model", "eval_accuracy"),
                       ("clients' held-out splits: mean", "client_eval_accuracy_mean"),
                       ("clients' held-out splits: worst client", "client_eval_accuracy_worst")):
        assert drawn[label] == pytest.approx([r[key] for r in history])
