"""The convergence tasks: each builds its runs through one recipe's ``build(...)``.

A task parses the run's options as the recipe's command line would (recipe defaults beneath them),
loads its data once (seed 0: every run and seed sees the same examples, only the federation varies)
and hands that copy to the recipe's ``build`` with every run.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from recipes.common import RecipeBuild

CACHE_DIR = Path(os.environ.get("FEDSMOOTH_BENCH_CACHE", Path.home() / ".cache" / "fedsmooth_hf" / "bench"))
TINY_VIT = {"vit_hidden_size": 16, "vit_layers": 1, "vit_heads": 2, "pretrain_steps": 0}


def tokens(options: dict) -> list[str]:
    """Returns `options` as command-line tokens: `{"a": 1, "b": [2, 3]}` -> `--a 1 --b 2 3`."""
    out = []
    for key, value in options.items():
        out += [f"--{key}", *(str(v) for v in value)] if isinstance(value, list) else [f"--{key}", str(value)]
    return out


class RecipeTask:
    """One recipe's offline setting as a benchmark task.

    Args:
        device (`str`): Where every run trains, `"cpu"` or `"cuda"` (the first GPU).
    """

    RECIPE = ""  # the recipe module the task builds through

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._data = None

    @property
    def recipe(self):
        """The recipe module (`recipes.<name>`): its `parse_args`, `build` and data loading."""
        return importlib.import_module(self.RECIPE)

    def parse(self, options: dict, seed: int, out_dir: str) -> tuple:
        """Parses `options` with the recipe's parser; every run logs each step and prints no bar.

        Returns:
            `(TrainingArguments, FederatedArguments, FedSmoothLoRAConfig, recipe arguments)`.
        """
        return self.recipe.parse_args(tokens({**options, "output_dir": out_dir, "seed": seed, "logging_steps": 1,
                                              "disable_tqdm": True, "use_cpu": self.device == "cpu"}))

    def build(self, options: dict, seed: int, out_dir: str) -> RecipeBuild:
        """Builds one run: `options` are recipe arguments, `seed` the run's seed, `out_dir` a scratch folder."""
        raise NotImplementedError


def pretrained_vit_body(va, args) -> dict:
    """The ViT recipe's digits-pretrained small ViT body, trained once (seed 0) and cached under `CACHE_DIR`."""
    import torch

    from recipes.vit_pretrain import head_free_weights, pretrain_small_vit

    key = f"vit_h{va.vit_hidden_size}_l{va.vit_layers}_p{va.patch_size}_s{va.pretrain_steps}_seed0.pt"
    path = CACHE_DIR / key
    if path.exists():
        return torch.load(path, weights_only=True)
    seed = args.seed
    args.seed = 0  # one source model for every run and seed: only the federated part varies
    model, info = pretrain_small_vit(va, args, main_proc=True)
    args.seed = seed
    body = head_free_weights(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(body, path)
    path.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return body


class VitTask(RecipeTask):
    """The ViT recipe's offline setting; `tiny`: a 1-layer ViT from scratch on sklearn digits.

    Args:
        tiny (`bool`): Seconds-sized runs (CI): no pretraining, the source task's digits as the data.
        device (`str`): Where every run trains.
    """

    RECIPE = "recipes.vit_classification"

    def __init__(self, tiny: bool, device: str = "cpu"):
        super().__init__(device)
        self.tiny = tiny
        self._body = None

    def parse(self, options, seed, out_dir):
        return super().parse({**options, **(TINY_VIT if self.tiny else {})}, seed, out_dir)

    def build(self, options, seed, out_dir):
        from recipes.vit_data import load_offline_data
        from recipes.vit_pretrain import SOURCE_TASK, digits_source_task

        args, fed_args, method, va = self.parse(options, seed, out_dir)
        if self._data is None:
            if self.tiny:
                train, evals = digits_source_task(0)
                self._data = (train, evals, [str(d) for d in range(10)], SOURCE_TASK)
            else:
                self._data = load_offline_data(va, seed=0)
        if self._body is None and not self.tiny:
            self._body = pretrained_vit_body(va, args)
        return self.recipe.build(args, fed_args, method, va, data=self._data, body=self._body)


class NlgTask(RecipeTask):
    """The NLG recipe's offline setting: SmolLM2-135M-Instruct, WordNet definitions, clients by category."""

    RECIPE = "recipes.nlg_llama"

    def build(self, options, seed, out_dir):
        recipe = self.recipe
        args, fed_args, method, md = self.parse(options, seed, out_dir)
        if self._data is None:
            tokenizer = recipe.load_tokenizer(recipe.model_path(md))
            self._data = recipe.load_data(md, tokenizer, 0, keep=("category",))
        return recipe.build(args, fed_args, method, md, data=self._data)


class LmClassificationTask(RecipeTask):
    """The LM-classification recipe's offline setting: SmolLM2-135M with a new head, WordNet categories.

    The offline analogue of the paper's ViT-on-CIFAR protocol: a pretrained foundation backbone,
    a fresh head trained in full (`modules_to_save`), clients split by label.
    """

    RECIPE = "recipes.lm_classification"

    def build(self, options, seed, out_dir):
        recipe = self.recipe
        args, fed_args, method, la = self.parse(options, seed, out_dir)
        if self._data is None:
            self._data = recipe.load_data(la, recipe.load_tokenizer(recipe.model_path(la)), 0)
        return recipe.build(args, fed_args, method, la, data=self._data)


def make_task(name: str, device: str = "cpu") -> RecipeTask:
    """Returns the task that builds the runs of sweep `name` (a key of `settings.TASKS`)."""
    if name.startswith("lm-cls"):
        return LmClassificationTask(device)
    if name.startswith("vit"):
        return VitTask(tiny=False, device=device)
    if name == "tiny":
        return VitTask(tiny=True, device=device)
    return NlgTask(device)  # nlg, nlg8
