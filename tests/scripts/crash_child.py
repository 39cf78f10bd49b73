"""Child of tests/integration/test_crash_resume.py: federated runs SIGKILLed at named points, then resumed.

    python tests/scripts/crash_child.py WORKDIR KILL_POINT [KILL_POINT ...]

Imports once (importing costs far more than a run), then forks one process per
run, so every run and every resume is a separate process that starts from the
same freshly imported state and shares no memory with the run it resumes:

* ``WORKDIR/reference``: the uninterrupted run;
* per kill point ``P``: a run in ``WORKDIR/P`` that kills itself with SIGKILL at ``P``
  (after writing ``WORKDIR/P.reached``, proof the point was hit), then a fresh process
  that resumes it with ``train(resume_from_checkpoint=True)``.

``WORKDIR/report.json`` records each process's exit, what ``latest_checkpoint`` saw
after the kill and which temporaries the kill left behind.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: `support`

import torch  # noqa: E402
from support.tiny import make_counting_dataset, make_tiny_llama  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

import fedsmooth_hf.engine.local_round as local_round_module  # noqa: E402
import fedsmooth_hf.persistence.checkpoint as checkpoint_module  # noqa: E402
import fedsmooth_hf.trainer.trainer as trainer_module  # noqa: E402
from fedsmooth_hf import FederatedArguments, FederatedTrainer  # noqa: E402
from fedsmooth_hf.engine.callbacks import FederatedCallback  # noqa: E402
from fedsmooth_hf.persistence.checkpoint import latest_checkpoint  # noqa: E402

KILL_ROUND = 2  # 1-based round in which every kill point (but one) fires
KILL_POINTS = (
    "gradient_estimation",  # FedSmoothLoRA's gradient pass of the round's 2nd client
    "client_training",  # inside the 2nd client's local Trainer loop, after its first step
    "aggregation",  # the server aggregate computed (strategy state changed), not merged
    "merge",  # half of the layers merged into the base, the rest not
    "evaluation",  # inside the global model's evaluation after the merge
    "checkpoint_files",  # round-2 temporary dir holds model.safetensors, not the rest
    "checkpoint_rename",  # every round-2 file written and fsynced, the rename not done
    "between_rounds",  # round-2 checkpoint published, round 3 about to start
)


def build_trainer(output_dir: Path) -> FederatedTrainer:
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=8, learning_rate=5e-3,
                             report_to="none", logging_steps=1, use_cpu=True, disable_tqdm=True, save_strategy="no")
    fed = FederatedArguments(strategy="fedsmoothlora", num_clients=4, clients_per_round=3, num_rounds=3,
                             local_steps=2, lora_r=4, lora_alpha=8, ga_samples=16, ga_batch_size=8,
                             save_rounds=1, zeta_mode="cosine")
    return FederatedTrainer(model=make_tiny_llama(), args=args, fed_args=fed,
                            train_dataset=make_counting_dataset(96), eval_dataset=make_counting_dataset(16, seed=1))


def install_kill_point(trainer: FederatedTrainer, point: str, marker: Path) -> None:
    """Arrange for this process to SIGKILL itself when the run reaches ``point``."""

    def die():
        marker.write_text(point)
        os.kill(os.getpid(), signal.SIGKILL)

    second_client = trainer.sample_clients(KILL_ROUND - 1)[1]

    if point == "gradient_estimation":
        inner = local_round_module.estimate_gradient_subspaces

        def estimate(*args, **kwargs):
            if trainer.round_context == (KILL_ROUND, second_client):
                die()
            return inner(*args, **kwargs)

        local_round_module.estimate_gradient_subspaces = estimate
    elif point == "client_training":

        class KillInLocalLoop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if trainer.round_context == (KILL_ROUND, second_client) and state.global_step == 1:
                    die()

        trainer.add_callback(KillInLocalLoop())
    elif point == "aggregation":
        inner_aggregate = trainer.strategy.aggregate

        def aggregate(uploads, weights):
            update = inner_aggregate(uploads, weights)
            if trainer.strategy.round == KILL_ROUND - 1:
                die()
            return update

        trainer.strategy.aggregate = aggregate
    elif point == "merge":
        inner_merge = trainer_module.merge_into_base

        def merge(layers, merge, *args, **kwargs):
            if trainer.round_context == (KILL_ROUND, None):
                first_half = dict(list(merge.items())[: len(merge) // 2])
                inner_merge(layers, first_half, *args, **kwargs)
                die()
            return inner_merge(layers, merge, *args, **kwargs)

        trainer_module.merge_into_base = merge
    elif point == "evaluation":

        class KillInEvaluation(TrainerCallback):
            def on_prediction_step(self, args, state, control, **kwargs):
                if trainer.round_context == (KILL_ROUND, None):
                    die()

        trainer.add_callback(KillInEvaluation())
    elif point == "checkpoint_files":
        inner_save = checkpoint_module._save_tensors

        def save_tensors(tensors, path):
            if path.parent.name.startswith(f".round-{KILL_ROUND}.tmp") and path.name == checkpoint_module.STRATEGY_FILE:
                die()
            return inner_save(tensors, path)

        checkpoint_module._save_tensors = save_tensors
    elif point == "checkpoint_rename":
        inner_rename = checkpoint_module._rename_into_place

        def rename(tmp, final):
            if final.name == f"round-{KILL_ROUND}":
                die()
            return inner_rename(tmp, final)

        checkpoint_module._rename_into_place = rename
    elif point == "between_rounds":

        class KillBeforeNextRound(FederatedCallback):
            def on_round_begin(self, args, state, control, round, clients, **kwargs):
                if round == KILL_ROUND + 1:
                    die()

        trainer.add_callback(KillBeforeNextRound())
    else:
        raise ValueError(f"unknown kill point {point!r}; known: {KILL_POINTS}")


def in_child(work) -> dict:
    """Run ``work()`` in a forked process; how that process ended."""
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
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status), "exit": None}
    return {"signal": None, "exit": os.WEXITSTATUS(status)}


def resume(run_dir: Path, rounds_file: Path) -> None:
    """Resume the latest checkpoint in ``run_dir``; record which rounds this process ran."""
    rounds_run = []

    class RecordRounds(FederatedCallback):
        def on_round_begin(self, args, state, control, round, clients, **kwargs):
            rounds_run.append(round)

    trainer = build_trainer(run_dir)
    trainer.add_callback(RecordRounds())
    trainer.train(resume_from_checkpoint=True)
    rounds_file.write_text(json.dumps(rounds_run))


def main(workdir: Path, points: list[str]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    report = {"reference": in_child(lambda: build_trainer(workdir / "reference").train())}
    for point in points:
        run_dir = workdir / point

        def killed_run(point=point, run_dir=run_dir):
            trainer = build_trainer(run_dir)
            install_kill_point(trainer, point, workdir / f"{point}.reached")
            trainer.train()

        killed = in_child(killed_run)
        latest = latest_checkpoint(run_dir)
        killed["latest_after_kill"] = None if latest is None else latest.name
        killed["entries_after_kill"] = sorted(p.name for p in run_dir.iterdir())
        rounds_file = workdir / f"{point}.resumed_rounds.json"
        resumed = in_child(lambda run_dir=run_dir, rounds_file=rounds_file: resume(run_dir, rounds_file))
        resumed["entries_after_resume"] = sorted(p.name for p in run_dir.iterdir())
        resumed["rounds_run"] = json.loads(rounds_file.read_text()) if rounds_file.exists() else None
        report[point] = {"killed": killed, "resumed": resumed}
    (workdir / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)  # before any fork: no thread pool is ever started in the parent
    main(Path(sys.argv[1]), sys.argv[2:] or list(KILL_POINTS))
