"""Ctrl-C during a local round: the federation stops within one training step, aggregates nothing of that
round, names the checkpoint and the call that resumes it, and the resumed run ends where an uninterrupted
one does; a second Ctrl-C aborts at once.

A subprocess (tests/scripts/interrupt_child.py) runs a tiny 3-round federation that checkpoints every
round; the test sends it SIGINT during the first step of round 2's second client, a step the child makes
last STEP_S seconds, so an uninterrupted continuation would take several more such steps.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scripts.interrupt_child import FEDERATION, INTERRUPT_ROUND, STEP_S

from fedsmooth_hf.engine import interrupt
from fedsmooth_hf.engine.interrupt import InterruptCallback

TESTS = Path(__file__).resolve().parents[1]
CHILD = TESTS / "scripts" / "interrupt_child.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}


def _start(workdir: Path) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, str(CHILD), "run", str(workdir)], env=ENV,
                            stdout=open(workdir / "stdout.txt", "w"), stderr=open(workdir / "stderr.txt", "w"))


def _wait_ready(proc: subprocess.Popen, workdir: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (workdir / "ready").exists():
        assert proc.poll() is None, (workdir / "stderr.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "the child never reached the interrupted step"
        time.sleep(0.01)


def _steps_after_ready(workdir: Path) -> list[str]:
    """The optimizer steps logged after the one during which the test signalled."""
    lines = (workdir / "steps.log").read_text().split()
    rows = [tuple(map(int, lines[i:i + 3])) for i in range(0, len(lines), 3)]
    first = next(i for i, (r, _, step) in enumerate(rows) if r == INTERRUPT_ROUND and step == 1 and i > 0
                 and rows[i - 1][0] == INTERRUPT_ROUND)  # round 2's second client, its first step
    return rows[first + 1:]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("interrupt")
    proc = _start(workdir)
    _wait_ready(proc, workdir)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stopped = None  # seconds from the signal to the stop's report (the interpreter's own exit after it is not timed)
    while proc.poll() is None and time.monotonic() - sent < 300:
        if stopped is None and (workdir / "interrupted.json").exists():
            stopped = time.monotonic() - sent
        time.sleep(0.01)
    code = proc.wait(timeout=60)
    return workdir, code, stopped


def test_sigint_stops_within_one_step_and_names_the_resume_call(interrupted):
    workdir, code, stopped = interrupted
    stderr = (workdir / "stderr.txt").read_text()
    assert code == 130, stderr[-3000:]
    # at most the step the signal landed in is finished; the rest of the client and round 2's third client never run
    assert len(_steps_after_ready(workdir)) <= 1
    assert stopped is not None and stopped < 2 * STEP_S + 1, stopped  # not the 3 more slow steps of that client
    report = json.loads((workdir / "interrupted.json").read_text())
    run_dir = workdir / "run"
    assert report["round"] == INTERRUPT_ROUND and report["signal"] == "SIGINT"
    assert report["checkpoint"] == str(run_dir / "round-1")
    # nothing of round 2 was saved, not even a temporary directory
    assert sorted(p.name for p in run_dir.iterdir() if "round" in p.name) == ["round-1"]
    assert "[fedsmooth_hf] SIGINT: stopping after the current training step" in stderr
    assert f"stopped by SIGINT in round 2 of {FEDERATION['num_rounds']}, before its aggregation" in stderr
    assert f"resume from {run_dir / 'round-1'} (1 of 3 rounds done) with:" in stderr
    assert f"    trainer.train(resume_from_checkpoint='{run_dir / 'round-1'}')" in stderr
    assert report["command"] in stderr


def test_resuming_the_printed_call_ends_with_the_uninterrupted_eval_loss(interrupted):
    workdir, code, _ = interrupted
    assert code == 130
    command = json.loads((workdir / "interrupted.json").read_text())["command"]
    checkpoint = re.fullmatch(r"trainer\.train\(resume_from_checkpoint='(.+)'\)", command).group(1)
    proc = subprocess.run([sys.executable, str(CHILD), "finish", str(workdir), checkpoint], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    finish = json.loads((workdir / "finish.json").read_text())
    assert finish["rounds"] == [2, 3]  # the interrupted round again, then the last
    resumed, reference = finish["history"], finish["reference"]
    assert [r["round"] for r in resumed] == [r["round"] for r in reference] == [0, 1, 2, 3]
    assert resumed[-1]["eval_loss"] == reference[-1]["eval_loss"]  # same seed, same arithmetic: equal, not close
    assert [r.get("train_loss") for r in resumed] == [r.get("train_loss") for r in reference]


def test_second_sigint_aborts_at_once(tmp_path):
    proc = _start(tmp_path)
    _wait_ready(proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # the first handler has run: the child sleeps inside the step
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=300)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == -signal.SIGINT, stderr[-3000:]  # an unhandled KeyboardInterrupt, as without the graceful stop
    assert "KeyboardInterrupt" in stderr and "stopped by" not in stderr
    assert _steps_after_ready(tmp_path) == []
    assert not (tmp_path / "interrupted.json").exists()


# ---------------------------------------------------------------------------- in process: handlers and the hint
def _handlers_during_training(tmp_path) -> list:
    """SIGINT's handler as each optimizer step of a one-round federation saw it."""
    from support.trainers import tiny_trainer
    from transformers import TrainerCallback

    seen = []

    class Look(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(signal.getsignal(signal.SIGINT))

    trainer = tiny_trainer(tmp_path, fed={"num_rounds": 1, "local_steps": 1, "clients_per_round": 1})
    trainer.add_callback(Look())
    trainer.train()
    return seen


def test_handlers_are_installed_for_the_federation_only(tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    seen = _handlers_during_training(tmp_path)
    assert seen and all(getattr(h, "__self__", None).__class__ is InterruptCallback for h in seen)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_an_ignored_sigint_stays_ignored(tmp_path):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's, or nohup's
    try:
        assert set(_handlers_during_training(tmp_path)) == {signal.SIG_IGN}
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def registered():
    yield interrupt.set_resume_command
    interrupt.set_resume_command(None)


def test_the_hint_is_the_python_call_without_a_registered_command():
    assert interrupt.resume_command(Path("out/round-2")) == "trainer.train(resume_from_checkpoint='out/round-2')"
    assert interrupt.resume_command(None) == "trainer.train()"


def test_the_hint_is_the_registered_command_line_with_the_flag_set(registered, monkeypatch):
    monkeypatch.setattr(interrupt, "_parent_command", lambda: ["-bash"])
    registered(["recipes/nlg_llama.py", "run.yaml", "--resume_from_checkpoint", "old/round-1", "--num_rounds", "5",
                "--resume_from_checkpoint=true"])
    python, *rest = shlex.split(interrupt.resume_command(Path("out dir/round-3")))
    assert os.path.abspath(python) == sys.executable
    assert rest == ["recipes/nlg_llama.py", "run.yaml", "--num_rounds", "5", "--resume_from_checkpoint",
                    "out dir/round-3"]


def test_under_accelerate_launch_the_hint_repeats_the_launcher(registered, monkeypatch):
    launcher = [sys.executable, ".venv/bin/accelerate", "launch", "--config_file",
                "recipes/configs/accelerate_cpu.yaml",
                "recipes/nlg_llama.py", "--save_rounds", "1", ""]  # /proc's cmdline ends with a NUL
    monkeypatch.setattr(interrupt, "_parent_command", lambda: launcher)
    registered(["recipes/nlg_llama.py", "--save_rounds", "1"])
    assert interrupt.resume_command(Path("o/round-2")) == (
        ".venv/bin/accelerate launch --config_file recipes/configs/accelerate_cpu.yaml recipes/nlg_llama.py "
        "--save_rounds 1 --resume_from_checkpoint o/round-2")
    # no checkpoint yet: the same command again
    assert interrupt.resume_command(None).endswith("recipes/nlg_llama.py --save_rounds 1")
