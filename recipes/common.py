"""What every recipe does the same way: read its arguments, guard its output folder, save and push.

Arguments layer in one order in every recipe: command line > config file > recipe defaults >
library defaults. The recipe defaults are the parser's own defaults, so ``--help`` shows the
values a run really uses.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from fedsmooth_hf import FederatedArguments

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
RESUME_LATEST = ("true", "1")  # --resume_from_checkpoint values meaning "the latest round-<k> in output_dir"


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
    """The parser of (TrainingArguments, FederatedArguments, recipe_arguments), with the recipe's defaults."""
    parser = HfArgumentParser((TrainingArguments, FederatedArguments, recipe_arguments))
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
    """(TrainingArguments, FederatedArguments, recipe arguments) from ``[config.yaml|config.json] [--flag value ...]``."""
    parser = recipe_parser(recipe_arguments, defaults)
    argv, config = list(argv), {}
    if argv and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        config = read_config(argv[0])
        set_defaults(parser, config, source=argv[0])
        argv = argv[1:]
    _fit_clients_per_round(parser, defaults, config, argv)
    args, fed_args, recipe_args = parser.parse_args_into_dataclasses(args=argv)
    check_resume(args)
    return args, fed_args, recipe_args


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
    """Removes ``output_dir`` again if a run that created it fails while it is still empty."""
    path = Path(output_dir)
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed and path.is_dir() and not any(path.iterdir()):
            shutil.rmtree(path, ignore_errors=True)
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
