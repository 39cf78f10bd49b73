"""Child of tests/engine/test_interrupt.py: a tiny federation that the test interrupts with SIGINT mid-round.

    python tests/scripts/interrupt_child.py run WORKDIR       # writes WORKDIR/ready, waits for the signal(s)
    python tests/scripts/interrupt_child.py finish WORKDIR CHECKPOINT

``run``: a 3-round federation into ``WORKDIR/run`` (a checkpoint every round) that logs every optimizer
step to ``WORKDIR/steps.log`` (``round client step``). At the first step of round 2's second client it
writes ``WORKDIR/ready`` and from then on every step of that client lasts at least ``STEP_S`` seconds,
so the test's signal lands inside a known step. A ``FederationInterrupted`` is written to
``WORKDIR/interrupted.json`` and ends the process with status 130; anything else propagates.

``finish``: imports once and forks, so each run starts from the same freshly imported state: the
uninterrupted run (``WORKDIR/reference``) and a fresh process resuming ``CHECKPOINT``; their round
histories go to ``WORKDIR/finish.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: `support`

import torch  # noqa: E402
from support.tiny import make_counting_dataset  # noqa: E402
from support.trainers import tiny_trainer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from fedsmooth_hf.engine.callbacks import FederatedCallback  # noqa: E402
from fedsmooth_hf.engine.interrupt import FederationInterrupted  # noqa: E402

INTERRUPT_ROUND = 2  # 1-based round the test interrupts, in its second client's local round
STEP_S = 1.0  # least duration of each step of that client once `ready` is written
FEDERATION = dict(strategy="fedsmoothlora", num_clients=4, clients_per_round=3, num_rounds=3, local_steps=4,
                  save_rounds=1, zeta_mode="cosine")


def build_trainer(output_dir: Path):
    return tiny_trainer(output_dir, fed=FEDERATION, eval_dataset=make_counting_dataset(16, seed=1), logging_steps=1)


class PacedSteps(TrainerCallback):
    """Logs each optimizer step; from the first step of the interrupted client on, each lasts STEP_S."""

    def __init__(self, trainer, workdir: Path):
        self.trainer, self.workdir = trainer, workdir
        self.client = trainer.sample_clients(INTERRUPT_ROUND - 1)[1]

    def on_step_end(self, args, state, control, **kwargs):
        round_number, client = self.trainer.round_context
        with open(self.workdir / "steps.log", "a") as log:
            log.write(f"{round_number} {client} {state.global_step}\n")
        if (round_number, client) == (INTERRUPT_ROUND, self.client):
            if state.global_step == 1:
                (self.workdir / "ready").write_text("ready")
            time.sleep(STEP_S)  # the signal's handler runs during the sleep, which then goes on


def run(workdir: Path) -> None:
    trainer = build_trainer(workdir / "run")
    trainer.add_callback(PacedSteps(trainer, workdir))
    try:
        trainer.train()
    except FederationInterrupted as stop:
        (workdir / "interrupted.json").write_text(json.dumps(
            {"round": stop.round, "signal": stop.signal_name, "checkpoint": str(stop.checkpoint),
             "command": stop.command}))
        sys.exit(130)


def in_child(work) -> None:
    """Run ``work()`` in a forked process; fail if it fails."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            work()
        except BaseException:  # noqa: BLE001 - reported through the exit code
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child ended with status {status}"


def finish(workdir: Path, checkpoint: str) -> None:
    report = {}

    def reference():
        trainer = build_trainer(workdir / "reference")
        trainer.train()
        (workdir / "reference.json").write_text(json.dumps(trainer.round_history))

    def resumed():
        rounds_run = []

        class RecordRounds(FederatedCallback):
            def on_round_begin(self, args, state, control, round, clients, **kwargs):
                rounds_run.append(round)

        trainer = build_trainer(workdir / "run")
        trainer.add_callback(RecordRounds())
        trainer.train(resume_from_checkpoint=checkpoint)
        (workdir / "resumed.json").write_text(json.dumps({"history": trainer.round_history, "rounds": rounds_run}))

    in_child(reference)
    in_child(resumed)
    report["reference"] = json.loads((workdir / "reference.json").read_text())
    report.update(json.loads((workdir / "resumed.json").read_text()))
    (workdir / "finish.json").write_text(json.dumps(report))


if __name__ == "__main__":
    torch.set_num_threads(1)  # before any fork: no thread pool is ever started in the parent
    mode, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    if mode == "run":
        run(work)
    elif mode == "finish":
        finish(work, sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}: run or finish")
