"""Helpers of the recipe tests: running a recipe script offline, reading its --help, comparing parsed arguments.

Tiny checkpoints come from ``support.tiny`` (``save_tiny_llama_checkpoint``: a user's causal-LM directory).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `recipes` and `benchmarks` are not installed packages


def run_script(args: list[str], timeout: int = 600, threads: int | None = None) -> str:
    """Runs `args` (a recipe script and its flags) from the repository root, offline; returns stdout.

    A failing run fails the test with the tail of its output.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def help_defaults(text: str, flags: tuple[str, ...]) -> dict[str, str]:
    """Returns flag -> the `(default: X)` that `--help` prints for it (each flag must be listed)."""
    flat = " ".join(text.split("options:", 1)[1].split())  # the entries, not the usage line
    found = {}
    for flag in flags:
        match = re.search(rf"--{flag} {flag.upper()}\b.*?\(default: ([^)]*)\)", flat)
        assert match, f"--{flag} not in --help"
        found[flag] = match.group(1)
    return found


def parsed(args, fed, method, recipe) -> dict:
    """The four parsed argument groups as plain dicts (the clock-derived `logging_dir` left out), to compare."""
    from dataclasses import asdict

    training = args.to_dict()
    training.pop("logging_dir", None)  # derived from output_dir and the clock when not given
    return {"training": training, "federated": fed.to_dict(), "method": asdict(method), "recipe": vars(recipe)}
