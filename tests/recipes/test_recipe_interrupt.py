"""Ctrl-C in a recipe run: it prints the recipe's own command line with `--resume_from_checkpoint` set to the
last round checkpoint, exits with status 130 and no traceback, and that exact command finishes the run.

(That a resumed federation ends exactly where an uninterrupted one does is tests/engine/test_interrupt.py's.)
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from support.recipes import ROOT
from support.tiny import save_tiny_llama_checkpoint

from fedsmooth_hf.engine import interrupt
from recipes import nlg_llama

TINY = ["--max_train_samples", "48", "--max_eval_samples", "8", "--num_clients", "2", "--clients_per_round", "2",
        "--num_rounds", "2", "--local_steps", "2", "--per_device_train_batch_size", "4", "--ga_samples", "8",
        "--ga_batch_size", "4", "--max_new_tokens", "4", "--max_length", "48", "--disable_tqdm", "true",
        "--save_rounds", "1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def test_a_recipe_registers_its_command_line_only_when_it_is_the_process(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recipes/nlg_llama.py", "--num_rounds", "2"])
    try:
        nlg_llama.parse_args()
        assert interrupt._registered == (["recipes/nlg_llama.py", "--num_rounds", "2"], "--resume_from_checkpoint")
        interrupt.set_resume_command(None)
        nlg_llama.parse_args(["--num_rounds", "3"])  # a caller's own arguments (a benchmark, a test): not a command
        assert interrupt._registered is None
    finally:
        interrupt.set_resume_command(None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny_llama_ckpt"))


def test_ctrl_c_prints_the_recipe_command_that_resumes_it(ckpt, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "recipes/nlg_llama.py", "--model_name_or_path", str(ckpt), "--output_dir", str(out),
               *TINY]
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=stdout, stderr=stderr)
        deadline = time.monotonic() + 600
        while "[round 1]" not in (tmp_path / "stdout.txt").read_text():  # round 1 evaluated; round 2 next
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=300)
    err = (tmp_path / "stderr.txt").read_text()
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "[round 2]" not in (tmp_path / "stdout.txt").read_text()
    resume = next(line.strip() for line in err.splitlines() if "recipes/nlg_llama.py" in line)
    python, *argv = shlex.split(resume)
    assert os.path.abspath(os.path.join(ROOT, python)) == sys.executable
    assert argv == [*command[1:], "--resume_from_checkpoint", str(out / "round-1")]
    assert f"resume from {out / 'round-1'} (1 of 2 rounds done) with:" in err

    finished = subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "[round 2]" in finished.stdout and "[round 1]" not in finished.stdout  # only the interrupted round ran
    history = json.loads((out / "results.json").read_text())["round_history"]
    assert [r["round"] for r in history] == [0, 1, 2]
