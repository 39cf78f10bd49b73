"""What every recipe does the same way: read its arguments, describe its run, guard its output folder, save and push.

Arguments layer in one order in every recipe: command line > config file > recipe defaults >
library defaults. The recipe defaults are the parser's own defaults, so ``--help`` shows the
values a run really uses.

Every recipe's ``build(...)`` returns one [`RecipeBuild`]: the `FederatedTrainer`'s keyword arguments
and what the run is about. The recipe's ``main``, the Flower app (recipes/flower) and the convergence
benchmark (benchmarks/convergence.py) all build through it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import shutil
import sys
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path

from peft import LoraGAConfig
from transformers import HfArgumentParser, TrainingArguments

from fedsmooth_hf import FederatedArguments, FederatedLoraConfig, FederatedTrainer, FedSmoothLoRAConfig
from fedsmooth_hf.engine.interrupt import FederationInterrupted, set_resume_command

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
RESUME_LATEST = ("true", "1")  # --resume_from_checkpoint values meaning "the latest round-<k> in output_dir"

#: What a recipe trains (`RecipeBuild.task`).
CAUSAL_LM = "causal-lm"
IMAGE_CLASSIFICATION = "image-classification"
SEQUENCE_CLASSIFICATION = "sequence-classification"


@dataclass
class RecipeBuild:
    """What every recipe's ``build(...)`` returns: the trainer's arguments and what the run is about.

    Args:
        trainer_kwargs (`dict`):
            Keyword arguments of `FederatedTrainer`: `model`, `args`, `fed_args`, `peft_config` (a
            `FederatedLoraConfig` carrying the `FedSmoothLoRAConfig`), `train_dataset`, `eval_dataset`,
            `data_collator`, `processing_class`, `callbacks` and, for the classifiers, `compute_metrics`.
        task (`str`):
            What is trained: `"causal-lm"`, `"image-classification"` or `"sequence-classification"`.
        model_name (`str`):
            The model, as reports name it (a checkpoint id, or what the offline default built).
        data_source (`str`):
            Where the data came from, as reports name it.
        class_names (`list[str]`, *optional*):
            The classifiers' label names in label-id order.
        pretraining (`dict`, *optional*):
            What a pretraining before the federation did (the ViT recipe's offline default: task, steps,
            holdout accuracy, seconds); `None` when the model came pretrained.
        eval_prompts (`list[str]`, *optional*):
            Prompts the generative recipe answers before and after training.
    """

    trainer_kwargs: dict
    task: str
    model_name: str
    data_source: str
    class_names: list[str] | None = None
    pretraining: dict | None = None
    eval_prompts: list[str] = field(default_factory=list)

    @property
    def args(self) -> TrainingArguments:
        """The run's `TrainingArguments`."""
        return self.trainer_kwargs["args"]

    @property
    def fed_args(self) -> FederatedArguments:
        """The run's `FederatedArguments`."""
        return self.trainer_kwargs["fed_args"]

    @property
    def method(self) -> FedSmoothLoRAConfig | None:
        """FedSmoothLoRA's options, as the LoRA config carries them."""
        peft_config = self.trainer_kwargs.get("peft_config")
        return getattr(peft_config, "fedsmoothlora_config", None)

    def make_trainer(self, **overrides) -> FederatedTrainer:
        """Returns a `FederatedTrainer` of `trainer_kwargs`; `overrides` replace (or add) keyword arguments."""
        return FederatedTrainer(**{**self.trainer_kwargs, **overrides})

    def describe(self) -> dict:
        """Returns the run in four entries: `model`, `data`, `train` and `eval` (the number of examples)."""
        evals = self.trainer_kwargs.get("eval_dataset")
        return {"model": self.model_name, "data": self.data_source, "train": len(self.trainer_kwargs["train_dataset"]),
                "eval": 0 if evals is None else len(evals)}


@dataclass
class PeftInitArguments:
    """Where the federation's adapter starts: one of peft's `init_lora_weights`, and the server's own examples.

    Every recipe's arguments carry these fields (`recipe_parser` adds them).

    Args:
        init_lora_weights (`str`, *optional*, defaults to `"true"`):
            peft's `LoraConfig.init_lora_weights`: `true` (peft's default, B = 0), `false`, `gaussian`,
            `pissa`, `pissa_niter_<k>`, `olora`, `orthogonal`, `lora_ga`. Strategies that keep one shared
            adapter (fedit, ffa_lora, fedex_lora) take any; the others only the default.
        server_calibration_samples (`int`, *optional*, defaults to 0):
            Training examples set aside before the partition, so no client holds them, and handed to the
            trainer as its `init_dataset`: what a data-dependent init (`lora_ga`) calibrates on.
    """

    init_lora_weights: str = field(default="true", metadata={
        "help": "peft's init_lora_weights: true (default), false, gaussian, pissa, pissa_niter_<k>, olora, "
                "orthogonal, lora_ga (fedit, ffa_lora, fedex_lora only)"})
    server_calibration_samples: int = field(default=0, metadata={
        "help": "training examples the server keeps (taken out before the partition, no client has them) to "
                "calibrate a data-dependent init on; lora_ga needs > 0"})

    def init_value(self) -> bool | str:
        """`init_lora_weights` as peft takes it (`true`/`false` become booleans)."""
        text = str(self.init_lora_weights).strip()
        return {"true": True, "false": False}.get(text.lower(), text)


@functools.cache
def with_peft_init_arguments(recipe_arguments: type) -> type:
    """The recipe's dataclass with the fields of [`PeftInitArguments`] (itself if it has them already)."""
    if issubclass(recipe_arguments, PeftInitArguments):
        return recipe_arguments
    return make_dataclass(recipe_arguments.__name__, [], bases=(recipe_arguments, PeftInitArguments),
                          namespace={"__module__": recipe_arguments.__module__, "__doc__": recipe_arguments.__doc__})


def server_calibration_split(train, recipe_args, seed: int):
    """Sets the server's calibration examples apart from the training data, before any partition.

    Args:
        train (`datasets.Dataset`): The training examples.
        recipe_args: The recipe's arguments (`server_calibration_samples`, `init_lora_weights`; absent: none).
        seed (`int`): Which examples are drawn.

    Returns:
        `(train, init_dataset)`: the rest in their order, and the drawn examples (`None` when none are asked).

    Raises:
        `ValueError`: `lora_ga` without `--server_calibration_samples`, or as many samples as training examples.
    """
    n = int(getattr(recipe_args, "server_calibration_samples", 0) or 0)
    init = getattr(recipe_args, "init_lora_weights", "true")
    if str(init).strip().lower() == "lora_ga" and n < 1:
        raise ValueError("--init_lora_weights lora_ga calibrates on examples only the server holds: set "
                         "--server_calibration_samples N (N > 0 training examples, taken out before the partition)")
    if n < 1:
        return train, None
    if n >= len(train):
        raise ValueError(f"--server_calibration_samples {n}: the training data has only {len(train)} examples, "
                         "and the clients need some")
    held = set(random.Random(seed).sample(range(len(train)), n))
    print(f"[recipe] {n} training examples set aside for the server's calibration (no client holds them)")
    return (train.select([i for i in range(len(train)) if i not in held]), train.select(sorted(held)))


def peft_start(fed_args: FederatedArguments, method: FedSmoothLoRAConfig | None, recipe_args, train,
               seed: int) -> dict:
    """The trainer's `peft_config`, `train_dataset` and, with server examples, `init_dataset` of a recipe's run.

    Args:
        fed_args (`FederatedArguments`): The LoRA fields.
        method (`FedSmoothLoRAConfig`, *optional*): FedSmoothLoRA's options.
        recipe_args: The recipe's arguments, with the [`PeftInitArguments`] fields.
        train (`datasets.Dataset`): The training examples, before the partition.
        seed (`int`): Which examples the server keeps ([`server_calibration_split`]).
    """
    train, init_dataset = server_calibration_split(train, recipe_args, seed)
    start = {"peft_config": lora_config(fed_args, method, recipe_args), "train_dataset": train}
    return start if init_dataset is None else {**start, "init_dataset": init_dataset}


def read_config(path: str) -> dict:
    """A JSON or YAML file of ``argument: value`` pairs."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        config = json.loads(text)
    else:
        import yaml

        config = yaml.safe_load(text) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a config file holds `argument: value` pairs, got a {type(config).__name__}")
    return config


def recipe_parser(recipe_arguments: type, defaults: dict) -> HfArgumentParser:
    """The parser of the four groups (TrainingArguments, FederatedArguments, FedSmoothLoRAConfig, recipe_arguments).

    `recipe_arguments` gets the fields of [`PeftInitArguments`] (`--init_lora_weights`,
    `--server_calibration_samples`), so every recipe takes them.

    Args:
        recipe_arguments (`type`): The recipe's own dataclass.
        defaults (`dict`): The recipe's defaults, set as the parser's own (so `--help` shows them).
    """
    groups = (TrainingArguments, FederatedArguments, FedSmoothLoRAConfig, with_peft_init_arguments(recipe_arguments))
    parser = HfArgumentParser(groups)
    set_defaults(parser, defaults, source="recipe DEFAULTS")
    return parser


def set_defaults(parser: HfArgumentParser, values: dict, source: str) -> None:
    """``parser.set_defaults`` with the parser's own types, refusing names it does not know.

    argparse converts only string defaults, and keeps an unknown name silently: a YAML ``lora_alpha: 16``
    must become 16.0 as ``--lora_alpha 16`` does, and a misspelt key must be an error.
    """
    actions = {}
    for action in parser._actions:
        if action.type is not None or action.dest not in actions:
            actions[action.dest] = action
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ValueError(f"{source}: unknown argument(s) {unknown}; `--help` lists the arguments")
    parser.set_defaults(**{key: _as_parsed(actions[key], value) for key, value in values.items()})


def _as_parsed(action, value):
    """``value`` as the command line would give it: scalars through their text, lists element by element."""
    if action.type is None or value is None or isinstance(value, dict):
        return value
    if action.nargs in ("+", "*") and not isinstance(value, (list, tuple)):
        value = [value]
    if isinstance(value, (list, tuple)):
        return [action.type(v if isinstance(v, str) else str(v)) for v in value]
    return value if isinstance(value, str) else str(value)  # argparse converts string defaults itself


def parse_recipe_args(recipe_arguments: type, defaults: dict, argv: list[str]):
    """Parses a recipe's command line: ``[config.yaml|config.json] [--flag value ...]``.

    Args:
        recipe_arguments (`type`): The recipe's own dataclass of model and data arguments.
        defaults (`dict`): The recipe's defaults of any of the four groups (`--help` shows them).
        argv (`list[str]`): The command line without the program name.

    Returns:
        `(TrainingArguments, FederatedArguments, FedSmoothLoRAConfig, recipe_arguments)`.
    """
    if list(argv) == sys.argv[1:]:  # this process's command line: after a Ctrl-C it is printed with the resume flag
        set_resume_command(sys.argv)
    parser = recipe_parser(recipe_arguments, defaults)
    argv, config = list(argv), {}
    if argv and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        config = read_config(argv[0])
        set_defaults(parser, config, source=argv[0])
        argv = argv[1:]
    _fit_clients_per_round(parser, defaults, config, argv)
    args, fed_args, method, recipe_args = parser.parse_args_into_dataclasses(args=argv)
    check_resume(args)
    return args, fed_args, method, recipe_args


def lora_config(fed_args: FederatedArguments, method: FedSmoothLoRAConfig | None,
                init: PeftInitArguments | None = None) -> FederatedLoraConfig:
    """The run's LoRA config: `fed_args`' LoRA fields, carrying FedSmoothLoRA's options (`method`).

    Args:
        fed_args (`FederatedArguments`): `lora_r`, `lora_alpha`, `lora_dropout`, `use_rslora`,
            `target_modules` (`None`: every `nn.Linear` but the output head) and `modules_to_save`.
        method (`FedSmoothLoRAConfig`, *optional*): The method's options (read by the `fedsmoothlora`
            strategy only); `None`: its defaults.
        init (`PeftInitArguments`, *optional*): peft's `init_lora_weights` (`lora_ga` gets peft's default
            `LoraGAConfig`); `None` or a recipe argument object without it: peft's default init.

    Returns:
        `FederatedLoraConfig`: the `peft_config` of `FederatedTrainer`.
    """
    start = init.init_value() if isinstance(init, PeftInitArguments) else True
    ga = {"lora_ga_config": LoraGAConfig()} if start == "lora_ga" else {}
    return FederatedLoraConfig(r=fed_args.lora_r, lora_alpha=fed_args.lora_alpha, lora_dropout=fed_args.lora_dropout,
                               use_rslora=fed_args.use_rslora, target_modules=fed_args.target_modules,
                               modules_to_save=fed_args.modules_to_save, fedsmoothlora_config=method,
                               init_lora_weights=start, **ga)


def _fit_clients_per_round(parser: HfArgumentParser, defaults: dict, config: dict, argv: list[str]) -> None:
    """A recipe's default clients_per_round never exceeds a num_clients the user chose (``--num_clients 2``).

    The user's own clients_per_round (config file or command line) is left to FederatedArguments to check.
    """
    flags = ("--clients_per_round", "--clients-per-round")
    if "clients_per_round" not in defaults or "clients_per_round" in config or any(
            a.split("=")[0] in flags for a in argv):
        return
    namespace, _ = parser.parse_known_args(argv)
    if namespace.clients_per_round is not None and namespace.clients_per_round > namespace.num_clients:
        print(f"[recipe] clients_per_round: the recipe default {namespace.clients_per_round} is more than "
              f"num_clients={namespace.num_clients}; every client takes part in every round")
        parser.set_defaults(clients_per_round=namespace.num_clients)


def check_resume(args: TrainingArguments) -> None:
    """A ``--resume_from_checkpoint`` path that does not exist is an error before anything loads."""
    path = args.resume_from_checkpoint
    if path and path.lower() not in RESUME_LATEST and not Path(path).exists():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path}: no such checkpoint (a round-<k> folder of a federated run; "
            f"'true' resumes from the latest one in --output_dir)"
        )


def resume_argument(args: TrainingArguments) -> str | bool | None:
    """What ``FederatedTrainer.train(resume_from_checkpoint=...)`` takes: a path, True (latest) or None."""
    path = args.resume_from_checkpoint
    if not path:
        return None
    return True if path.lower() in RESUME_LATEST else path


@contextlib.contextmanager
def output_dir_guard(output_dir: str):
    """Removes ``output_dir`` again if a run that created it fails while it is still empty. A run stopped by
    Ctrl-C (``FederationInterrupted``: the trainer printed how to resume) exits with status 130, no traceback."""
    path = Path(output_dir)
    existed = path.exists()
    try:
        yield
    except BaseException as err:
        if not existed and path.is_dir() and not any(path.iterdir()):
            shutil.rmtree(path, ignore_errors=True)
        if isinstance(err, FederationInterrupted):
            raise SystemExit(130) from None
        raise


def save_and_push(trainer, results: dict) -> Path:
    """The merged model and ``results.json`` in output_dir; pushed to the Hub when ``--push_to_hub``."""
    args = trainer.args
    trainer.save_model(args.output_dir)
    path = Path(args.output_dir) / "results.json"
    main_proc = trainer.is_world_process_zero()
    if main_proc:
        path.write_text(json.dumps(results, indent=1))
    if args.push_to_hub:
        url = trainer.push_to_hub()
        if main_proc:
            print(f"[recipe] pushed to the Hub: {url}")
    return path
