"""Wall-clock per round: client-parallel processes vs the default sequential client loop.

Three runs of the same federation (same seed, same clients, same local steps, same global
batch) on the same cores, side by side:

* ``sequential``: one process (all cores), clients one after another;
* ``data-parallel``: N processes, clients one after another, each local round
  split over the processes (the default under ``accelerate launch``; each process
  takes ``batch / N`` of every step's batch);
* ``client-parallel``: N processes, ``FederatedArguments(client_parallel=True)``:
  each process trains its own clients, uploads are all-gathered once per round.

The per-round time excludes round 1 (process start and first-use costs) and the worker's
digest of the merged model (``tests/distributed_worker.py``'s ``RoundRecorder``, a check, not
federation work). Each run also reports its clients' own local-round time (``client_work_s``,
the sum over the round's clients of training + strategy overhead) and the rest of the round
(``outside_clients_s``: gather, aggregation, merge, evaluation, events; for client-parallel
also the wait for the slower process). Run::

    python benchmarks/client_parallel.py [--processes 2] [--clients 8] [--rounds 4]
    python benchmarks/client_parallel.py --model smollm2   # SmolLM2-135M, 4 clients x 10 steps, 3 rounds

``--model tiny`` (default) is a 2-layer Llama from a config on the counting task and writes
``client_parallel.json/.png``; ``--model smollm2`` is SmolLM2-135M-Instruct (offline, no download)
on WordNet definitions, batch 8 x 64 tokens, LoRA r = 8, and writes ``client_parallel_smollm2.json/.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, ROOT, machine, usable_cores  # noqa: E402
from recipes.plots import pyplot  # noqa: E402

# isort: split

WORKER = ROOT / "tests" / "distributed_worker.py"
MODES = ("sequential", "data-parallel", "client-parallel")
# per model: clients per round, local steps, rounds, global batch, examples per client
DEFAULTS = {
    "tiny": {"clients": 8, "local_steps": 8, "rounds": 4, "batch_size": 4, "examples_per_client": 16},
    "smollm2": {"clients": 4, "local_steps": 10, "rounds": 3, "batch_size": 8, "examples_per_client": None},
}


def plan(a: argparse.Namespace) -> tuple[list[str], str]:
    """The worker's arguments shared by every mode (batch size excepted) and the results' file stem.

    Args:
        a (`argparse.Namespace`): The parsed arguments; unset sizes (None) take ``DEFAULTS[a.model]``.
    """
    size = DEFAULTS[a.model]
    for key in ("clients", "local_steps", "rounds", "batch_size"):
        if getattr(a, key) is None:
            setattr(a, key, size[key])
    per_client = size["examples_per_client"] or a.batch_size * a.local_steps  # smollm2: one pass per local round
    common = ["--model", a.model, "--rounds", str(a.rounds), "--clients", str(a.clients),
              "--local_steps", str(a.local_steps), "--examples", str(per_client * a.clients),
              "--strategy", "fedsmoothlora"]
    if a.model == "smollm2":
        common += ["--seq_len", str(a.seq_len)]
    return common, "client_parallel" if a.model == "tiny" else f"client_parallel_{a.model}"


def batch_of(mode: str, batch: int, processes: int) -> int:
    """Per-process batch of ``mode``: data-parallel processes split one client's batch, the others take it whole."""
    if mode != "data-parallel":
        return batch
    if batch % processes:
        raise SystemExit(f"--batch_size {batch} does not split over {processes} data-parallel processes")
    return batch // processes


def summarize(mode: str, processes: int, threads: int, batch: int, rank0: dict, wall: float) -> dict:
    """One run's figures from rank 0's ``rank0.json`` (rounds 2..N).

    Args:
        mode (`str`): One of ``MODES``.
        processes (`int`): Processes of the run.
        threads (`int`): Threads per process.
        batch (`int`): Batch per process and step.
        rank0 (`dict`): The worker's record (``rounds``: digests and times; ``round_history``: the trainer's).
        wall (`float`): Seconds of the whole run, process start included.
    """
    rounds = rank0["rounds"]
    times = [b["time_s"] - a["time_s"] for a, b in zip(rounds, rounds[1:])]
    history = [h for h in rank0["round_history"] if h["round"] >= 2]
    work = [h["local_train_time_s"] + h["strategy_overhead_s"] for h in history]
    clients = len(history[0]["clients"]) if history else 1
    mean = sum(times) / len(times)
    client_work = sum(work) / len(work)
    in_parallel = processes if mode == "client-parallel" else 1
    return {"mode": mode, "processes": processes, "threads_per_process": threads, "batch_per_process": batch,
            "round_times_s": times,
            "mean_round_s": mean, "client_work_s": client_work, "per_client_s": client_work / clients,
            "outside_clients_s": mean - client_work / in_parallel,
            "eval_s": sum(h.get("eval_time_s", 0.0) for h in history) / len(history),
            "wall_s": wall, "final_eval_loss": rounds[-1]["eval_loss"], "final_sha256": rounds[-1]["sha256"]}


def run_mode(mode: str, processes: int, common: list[str], batch: int, out: Path) -> dict:
    """Runs the worker in ``mode`` (sequential: all cores to one process; else 1 thread per process).

    Args:
        mode (`str`): One of ``MODES``.
        processes (`int`): Processes of the parallel modes.
        common (`list[str]`): The worker's arguments from :func:`plan`.
        batch (`int`): A client's batch per step.
        out (`Path`): The worker's output folder.
    """
    threads = usable_cores() if mode == "sequential" else max(1, usable_cores() // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if mode == "sequential":
        cmd = [sys.executable, str(WORKER)]
    else:
        accelerate = str(Path(sys.executable).parent / "accelerate")
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER)]
    extra = ["--client_parallel"] if mode == "client-parallel" else []
    per_process = batch_of(mode, batch, processes)
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, "--out", str(out), *common, "--batch_size", str(per_process), *extra], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    rank0 = json.loads((out / "rank0.json").read_text())
    return summarize(mode, 1 if mode == "sequential" else processes, threads, per_process, rank0, wall)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    runs = result["runs"]
    colors = {"sequential": "#888", "data-parallel": "#59c", "client-parallel": "#e63"}
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar([r["mode"] for r in runs], [r["mean_round_s"] for r in runs], color=[colors[r["mode"]] for r in runs])
    for i, r in enumerate(runs):
        ax.text(i, r["mean_round_s"], f"{r['mean_round_s']:.2f} s", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds per round")
    ax.set_title(f"{result['model']}: {result['clients']} clients x {result['local_steps']} steps per round, "
                 f"{result['processes']} processes", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratios(runs: list[dict]) -> dict:
    """Client-parallel's round time, clients' time and final weights against the other modes that ran."""
    by = {r["mode"]: r for r in runs}
    out = {}
    cp = by.get("client-parallel")
    if cp and "sequential" in by:
        seq = by["sequential"]
        out["client_parallel_vs_sequential"] = cp["mean_round_s"] / seq["mean_round_s"]
        # one client at 1 thread per process vs at all threads: client-parallel's floor is this / processes
        out["per_client_cp_vs_sequential"] = cp["per_client_s"] / seq["per_client_s"]
        out["same_result_as_sequential"] = cp["final_sha256"] == seq["final_sha256"]
    if cp and "data-parallel" in by:
        out["client_parallel_vs_data_parallel"] = cp["mean_round_s"] / by["data-parallel"]["mean_round_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(DEFAULTS), default="tiny",
                   help="tiny: 2-layer Llama from a config; smollm2: SmolLM2-135M-Instruct, offline")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--clients", type=int, default=None, help="clients, all in every round (tiny 8, smollm2 4)")
    p.add_argument("--rounds", type=int, default=None, help="tiny 4, smollm2 3 (round 1 is not timed)")
    p.add_argument("--local_steps", type=int, default=None, help="tiny 8, smollm2 10")
    p.add_argument("--batch_size", type=int, default=None, help="a client's batch per step (tiny 4, smollm2 8)")
    p.add_argument("--seq_len", type=int, default=64, help="tokens per row (smollm2)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--out", default=str(RESULTS_DIR))
    a = p.parse_args()
    common, stem = plan(a)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in [m for m in MODES if m in a.modes]:
            runs.append(run_mode(mode, a.processes, common, a.batch_size, Path(tmp) / mode))
            r = runs[-1]
            print(f"{mode:>16}: {r['mean_round_s']:.2f} s/round (clients {r['client_work_s']:.2f} s, "
                  f"{r['per_client_s']:.2f} s each; outside them {r['outside_clients_s']:.2f} s; "
                  f"eval loss {r['final_eval_loss']:.4f}; run {r['wall_s']:.0f} s)", flush=True)
    compared = ratios(runs)
    result = {"model": a.model, "processes": a.processes, "clients": a.clients, "local_steps": a.local_steps,
              "rounds": a.rounds, "batch_size": a.batch_size, "seq_len": a.seq_len if a.model == "smollm2" else None,
              "cores": usable_cores(), "machine": machine(), "runs": runs, **compared}
    print("; ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in compared.items()))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png")


if __name__ == "__main__":
    main()
