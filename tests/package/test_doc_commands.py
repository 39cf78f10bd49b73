"""Every shell command README.md and docs/*.md tell a user to run: run here at a tiny size, or marked and checked.

Commands are read from the ```bash/```sh/```shell blocks (``tests/support/doc_commands.py``). A
command without a marker must be one this file runs: ``accelerate launch ... recipes/<recipe>.py``,
``python recipes/<recipe>.py`` or ``make demo`` (the Makefile's launch line). It runs as written,
in a scratch directory holding the files the doc assumes (``mine.jsonl``, ``run.yaml``) and a link
to ``recipes/``, with ``accelerate``/``python`` from this venv, ``...`` dropped, and size flags
appended (they override the doc's): a tiny Llama with SmolLM2's tokenizer for the LM recipes, the
small offline ViT shrunk further, 2 clients, 1 round of 1 step, a few samples, ``--output_dir`` in
the scratch directory. Commands that are the same after this mapping, but for ``accelerate launch``'s
own options, run once.

Markers, a comment line in the block (``# needs: GPU, Hub``; it marks the commands after it up to a
blank line) or in a command's own trailing comment, and what this file checks for each:

- ``needs: GPU``: CUDA GPUs (bf16, 4-bit QLoRA, DeepSpeed, several GPUs or machines). Every flag is
  one the recipe's parser knows, every repository file it names exists.
- ``needs: Hub``: downloads a model or dataset from the Hugging Face Hub, or pushes to it. Same checks.
- ``needs: network``: installs software (git clone, pip, make's installs). The extras it names exist in
  setup.py, a pinned torch is the Makefile's, a wheel's version is setup.py's, a make target exists.
- ``needs: minutes`` / ``needs: hours``: a benchmark of more than this file's budget (minutes, or a
  sweep of hours; they write benchmarks/results). The script's ``--help`` runs and lists every flag used.
- ``tested: <test file>``: another test runs the command (the Flower deployment test reads docs/flower.md
  and runs its commands; the benchmark smoke test runs the smoke sizes). The file exists and names the
  doc or the script.

An unmarked command this file cannot run fails with its file and line.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from support.doc_commands import ROOT, all_commands
from support.tiny import save_tiny_llama_checkpoint

BIN = Path(sys.executable).parent
MARKERS = {"GPU", "Hub", "network", "minutes", "hours"}
RECIPE = re.compile(r"(?:^|\s)recipes/(nlg_llama|vit_classification|lm_classification)\.py(?:\s|$)")
RUNNABLE = re.compile(r"^(?:accelerate launch (?:--\S+ (?:\S+ )?)*|python )recipes/\w+\.py\b|^make demo$")
COMMON = "--num_clients 2 --clients_per_round 2 --num_rounds 1 --local_steps 1 --disable_tqdm true"
SIZES = {
    "nlg_llama": f"--model_name_or_path {{tiny}} {COMMON} --max_train_samples 16 --max_eval_samples 4 "
                 "--per_device_train_batch_size 4 --ga_samples 4 --ga_batch_size 4 --max_length 48 --max_new_tokens 2",
    "lm_classification": f"--model_name_or_path {{tiny}} --backbone_layers 0 {COMMON} --max_train_samples 32 "
                         "--max_eval_samples 16 --per_device_train_batch_size 4 --ga_samples 4 --ga_batch_size 4 "
                         "--max_length 24",
    "vit_classification": f"{COMMON} --max_train_samples 64 --max_eval_samples 32 --per_device_train_batch_size 8 "
                          "--ga_samples 8 --ga_batch_size 8 --pretrain_steps 2 --vit_hidden_size 16 --vit_layers 1 "
                          "--vit_heads 2",
}
COMMANDS = all_commands()


def _make_demo_line() -> str:
    """The launch line of the Makefile's ``demo`` target (its installs are ``make test``'s, marked network)."""
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    lines = [line.strip() for line in recipe.splitlines() if "recipes/" in line and not line.strip().startswith("#")]
    assert len(lines) == 1, recipe
    return lines[0].replace("$(VENV)/bin/", "")


def runnable(text: str) -> str | None:
    """The command as this file runs it (before sizes), or None if it is not one it can run."""
    if not RUNNABLE.match(text):
        return None
    if text == "make demo":
        text = _make_demo_line()
    text = re.sub(r"(^|\s)\.\.\.(?=\s|$)", " ", text)
    text = re.sub(r"(^|\s)accelerate launch ", rf"\1{BIN}/accelerate launch ", text)
    text = re.sub(r"^python ", f"{sys.executable} ", text)
    return " ".join(text.split())


def _groups() -> dict[str, list[str]]:
    """Command to run -> the doc lines it stands for. Commands that differ only in ``accelerate launch``'s
    own options (``--config_file recipes/configs/accelerate_cpu.yaml``, ``--num_processes 1 --cpu``: on a
    CPU machine all start the same one process) run once, as the most explicit of them."""
    by_key: dict[str, list[tuple[str, str]]] = {}
    for command in COMMANDS:
        if not (command.needs or command.tested) and (mapped := runnable(command.text)):
            key = re.sub(r"accelerate launch .*?(?=recipes/\w+\.py)", "accelerate launch ", mapped)
            by_key.setdefault(key, []).append((mapped, command.where))
    return {max(variants, key=lambda v: len(v[0]))[0]: [where for _, where in variants]
            for variants in by_key.values()}


GROUPS = _groups()


def test_every_command_is_run_or_marked():
    problems = []
    for command in COMMANDS:
        unknown = command.needs - MARKERS
        if unknown:
            problems.append(f"{command.where}: unknown marker(s) {sorted(unknown)}: {command.text}")
        if not (command.needs or command.tested) and runnable(command.text) is None:
            problems.append(f"{command.where}: neither run by tests/package/test_doc_commands.py nor marked "
                            f"'# needs: ...'/'# tested: ...': {command.text}")
    assert not problems, "\n".join(problems)
    assert len(COMMANDS) > 50 and len(GROUPS) >= 6  # the docs were read, and the recipes' commands run


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory with what the docs' commands assume: recipes/, a user's mine.jsonl and run.yaml."""
    root = tmp_path_factory.mktemp("doc_commands")
    (root / "recipes").symlink_to(ROOT / "recipes")
    rows = [f'{{"instruction": "Say the word number {i}.", "output": "word {i}", "category": "c{i % 3}"}}'
            for i in range(48)]
    (root / "mine.jsonl").write_text("\n".join(rows) + "\n")
    (root / "run.yaml").write_text("strategy: fedit\npartition: iid\n")
    save_tiny_llama_checkpoint(root / "tiny")
    return root


@pytest.mark.parametrize("command", sorted(GROUPS), ids=lambda c: ",".join(GROUPS[c]))
def test_documented_command_runs_at_a_tiny_size(scratch, command):
    recipe = RECIPE.search(command).group(1)
    out = scratch / f"out{sorted(GROUPS).index(command)}"
    sizes = SIZES[recipe].format(tiny=scratch / "tiny") + f" --output_dir {out}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-c", f"{command} {sizes}"], cwd=scratch, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{GROUPS[command]}: {command}\n{done.stdout[-2000:]}{done.stderr[-4000:]}"
    assert re.search(r"^\[round 1\]", done.stdout, re.M), done.stdout[-2000:]
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors")), sorted(os.listdir(out))


def _recipe_flags(recipe: str) -> set[str]:
    module = importlib.import_module(f"recipes.{recipe}")
    from recipes.common import recipe_parser

    arguments = next(getattr(module, name) for name in ("ModelDataArguments", "VitArguments",
                                                        "LmClassificationArguments") if hasattr(module, name))
    return {flag for action in recipe_parser(arguments, {})._actions for flag in action.option_strings}


def test_gpu_and_hub_commands_name_flags_and_files_that_exist():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    problems = []
    for command in COMMANDS:
        if not command.needs & {"GPU", "Hub"}:
            continue
        tokens = shlex.split(command.text)
        for token in tokens:
            if re.match(r"(recipes|benchmarks)/\S+\.(py|json|yaml)$", token) and not (ROOT / token).is_file():
                problems.append(f"{command.where}: {token} does not exist")
        match = RECIPE.search(command.text)
        if match:
            known = _recipe_flags(match.group(1))
            script_flags = tokens[tokens.index(f"recipes/{match.group(1)}.py") + 1:]
            problems += [f"{command.where}: {match.group(1)} has no flag {t}" for t in script_flags
                         if t.startswith("--") and t not in known]
    assert not problems, "\n".join(problems)


def _setup_py() -> tuple[set[str], str]:
    text = (ROOT / "setup.py").read_text()
    extras = set(re.findall(r'^\s*"([\w-]+)":\s*\[', text[text.index("extras_require"):], re.M))
    version = re.search(r'__version__ = "([^"]+)"', (ROOT / "fedsmooth_hf" / "version.py").read_text()).group(1)
    return extras, version


def test_install_commands_name_what_exists():
    extras, version = _setup_py()
    assert {"flower", "recipes", "dev"} <= extras, extras
    torch_pin = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    import torch

    assert torch.__version__.split("+")[0] == torch_pin  # the Makefile's pin is the build the tests run on
    problems, seen = [], 0
    for command in (c for c in COMMANDS if "network" in c.needs):
        seen += 1
        text = command.text
        for named in re.findall(r"\[([\w,-]+)\]", text):
            problems += [f"{command.where}: setup.py has no extra {e!r}" for e in named.split(",") if e not in extras]
        pin = re.search(r"torch==([\d.]+)", text)
        if pin and pin.group(1) != torch_pin:
            problems.append(f"{command.where}: torch=={pin.group(1)}, the Makefile pins {torch_pin}")
        if re.search(r"pip install torch\b(?!==)", text) or (pin and "download.pytorch.org/whl/" not in text):
            problems.append(f"{command.where}: a torch install without the CPU index pulls the CUDA build")
        wheel = re.search(r"fedsmooth_hf-([\w.]+)-py3", text)
        if wheel and wheel.group(1) != version:
            problems.append(f"{command.where}: wheel version {wheel.group(1)}, setup.py says {version}")
        target = re.match(r"make (\w+)$", text)
        if target:
            dry = subprocess.run(["make", "-n", target.group(1)], cwd=ROOT, capture_output=True, text=True)
            if dry.returncode != 0:
                problems.append(f"{command.where}: make -n {target.group(1)}: {dry.stderr}")
    assert not problems, "\n".join(problems)
    assert seen >= 4


def test_long_benchmarks_answer_help_with_the_flags_they_are_given():
    scripts: dict[str, set[str]] = {}
    for command in (c for c in COMMANDS if c.needs & {"minutes", "hours"}):
        match = re.search(r"\b(benchmarks/\w+\.py)((?:\s+\S+)*)", command.text)
        assert match, f"{command.where}: a long command that is not a benchmark script: {command.text}"
        scripts.setdefault(match.group(1), set()).update(t for t in match.group(2).split() if t.startswith("--"))
    assert len(scripts) >= 5, scripts
    # every script's own --help, in one interpreter (torch and transformers imported once)
    runner = ("import runpy, sys\n"
              "for script in sys.argv[1:]:\n"
              "    print(f'=== {script}', flush=True)\n"
              "    sys.argv = [script, '--help']\n"
              "    try:\n"
              "        runpy.run_path(script, run_name='__main__')\n"
              "    except SystemExit as exit_:\n"
              "        print(f'=== exit {exit_.code}', flush=True)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", runner, *sorted(scripts)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.findall(r"^=== (benchmarks/\S+)\n(.*?)^=== exit (\S+)$", done.stdout, re.M | re.S)
    helps = {script: text for script, text, _ in found}
    assert sorted(helps) == sorted(scripts) and {code for _, _, code in found} == {"0"}, done.stdout[-3000:]
    for script, flags in sorted(scripts.items()):
        assert "usage:" in helps[script], (script, helps[script][:500])
        assert not [f for f in flags if f not in helps[script]], (script, flags)


def test_commands_run_by_other_tests_are_named_there():
    problems = []
    for command in (c for c in COMMANDS if c.tested):
        for test in command.tested:
            path = ROOT / test
            if not path.is_file():
                problems.append(f"{command.where}: {test} does not exist")
                continue
            script = re.search(r"\b\w+/(\w+)\.py\b", command.text)
            names = {command.path} | ({script.group(1)} if script else set())
            if not any(name in path.read_text() for name in names):
                problems.append(f"{command.where}: {test} names neither {command.path} nor the script")
    assert not problems, "\n".join(problems)
