"""A recipe run prints nothing alarming: every stderr line of the NLG recipe's smallest run is a known
progress bar, and stdout carries no warning.

What used to show here, and where each went (issue #26): transformers' FutureWarning about
``is_gradient_checkpointing`` (peft's call; ``model.adapter.wrap_lora``), torch's "'pin_memory' ... no
accelerator" (``engine.local_round.unpinned_without_accelerator``), bitsandbytes' "Failed to load CPU
gemm_4bit_forward" and `kernels`' trust-check line at every ``import peft``, and DeepSpeed's "Setting
accelerator to CPU" (``fedsmooth_hf/_quiet.py``). A new line on stderr fails this test until it is
prevented or added below with the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from support.recipes import ROOT
from support.tiny import save_tiny_llama_checkpoint

#: the only stderr lines a run may print: tqdm progress bars (``desc: 42%|####| 5/12 [00:01<00:02, 3.1it/s]``)
#: of known tasks. Each segment between carriage returns/newlines is checked; blank ones (a closed bar) pass.
ALLOWED_BARS = (
    "Loading weights",  # transformers, from_pretrained
    "Writing model shards",  # transformers, save_pretrained (the tiny checkpoint, the merged model)
    "Map",  # datasets: tokenizing the train and eval rows
    "Filter",  # datasets: dropping rows with no response token
    "federated",  # ours: the federation's bar (engine.callbacks.FederatedProgressCallback), before round 1
    r"round \d+ client \d+",  # ours: the same bar, inside a client's round
)
BAR = re.compile(rf"^(?:{'|'.join(ALLOWED_BARS)}):\s+\d+%\|[^|]*\|\s*\d+/\d+ \[[^\]]*\]\s*$")

TINY = ["--max_train_samples", "48", "--max_eval_samples", "8", "--num_clients", "2", "--clients_per_round", "2",
        "--num_rounds", "2", "--local_steps", "2", "--per_device_train_batch_size", "4", "--ga_samples", "8",
        "--ga_batch_size", "4", "--max_new_tokens", "4", "--max_length", "48"]


def unexpected_lines(stderr: str) -> list[str]:
    """The stderr segments that are not an allowed progress bar."""
    segments = (s.strip() for s in re.split(r"[\r\n]", stderr))
    return [s for s in segments if s and not BAR.match(s)]


def test_allow_list_takes_bars_only():
    """The allow-list itself: bars of the known tasks pass, anything else (a warning, an unknown bar) does not."""
    bars = ("Map: 100%|██████████| 48/48 [00:00<00:00, 1714.34 examples/s]\r"
            "round 2 client 1:  75%|███████▌  | 6/8 [00:14<00:04,  2.35s/step, train_loss=10.8149]"
            "\n   \n")
    assert unexpected_lines(bars) == []
    warning = "dataloader.py:759: UserWarning: 'pin_memory' argument is set as true but no accelerator is found"
    download = "Downloading shards: 50%|█████     | 1/2 [00:01<00:01, 1.00s/it]"
    assert unexpected_lines(f"{bars}{warning}\n  warnings.warn(\n{download}\n") == [warning, "warnings.warn(",
                                                                                   download]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    ckpt = save_tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny_llama_ckpt"))
    out = tmp_path_factory.mktemp("clean") / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "recipes/nlg_llama.py", "--model_name_or_path", str(ckpt),
                           "--output_dir", str(out), *TINY], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_nlg_recipe_stderr_holds_progress_bars_only(recipe_run):
    assert "[round 2]" in recipe_run.stdout  # the run is real: it trained and printed its rounds
    assert BAR.match("federated:   0%|          | 0/8 [00:00<?, ?step/s]")
    assert any(BAR.match(s.strip()) for s in re.split(r"[\r\n]", recipe_run.stderr)), "no progress bar: not tqdm's?"
    assert unexpected_lines(recipe_run.stderr) == []


def test_nlg_recipe_stdout_has_no_warning(recipe_run):
    # DeepSpeed logs to stdout: "[WARNING] [real_accelerator.py...] Setting accelerator to CPU"
    noisy = [line for line in recipe_run.stdout.splitlines() if re.search(r"warn|error|deprecat", line, re.I)]
    assert noisy == []
