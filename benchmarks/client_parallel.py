"""Wall-clock per round: client-parallel processes vs the default sequential client loop.

Three runs of the same federation (same seed, same clients, same local steps) on
the same cores, side by side:

* ``sequential``: one process (all cores), clients one after another;
* ``data-parallel``: N processes, clients one after another, each local round
  split over the processes (the default under ``accelerate launch``);
* ``client-parallel``: N processes, ``FederatedArguments(client_parallel=True)``:
  each process trains its own clients, uploads are all-gathered once per round.

The per-round time excludes round 1 (process start and first-use costs). Run::

    python benchmarks/client_parallel.py [--processes 2] [--clients 8] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, ROOT, usable_cores  # noqa: E402
from recipes.plots import pyplot  # noqa: E402

# isort: split

WORKER = ROOT / "tests" / "distributed_worker.py"


def run_mode(mode: str, processes: int, common: list[str], out: Path) -> dict:
    threads = usable_cores() if mode == "sequential" else max(1, usable_cores() // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if mode == "sequential":
        cmd = [sys.executable, str(WORKER)]
    else:
        accelerate = str(Path(sys.executable).parent / "accelerate")
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER)]
    extra = ["--client_parallel"] if mode == "client-parallel" else []
    proc = subprocess.run([*cmd, "--out", str(out), *common, *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    rounds = json.loads((out / "rank0.json").read_text())["rounds"]
    times = [b["time_s"] - a["time_s"] for a, b in zip(rounds, rounds[1:])]
    return {"mode": mode, "processes": 1 if mode == "sequential" else processes, "threads_per_process": threads,
            "round_times_s": times, "mean_round_s": sum(times) / len(times),
            "final_eval_loss": rounds[-1]["eval_loss"], "final_sha256": rounds[-1]["sha256"]}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar([r["mode"] for r in runs], [r["mean_round_s"] for r in runs], color=["#888", "#59c", "#e63"])
    for i, r in enumerate(runs):
        ax.text(i, r["mean_round_s"], f"{r['mean_round_s']:.2f} s", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds per round")
    ax.set_title(f"{result['clients']} clients x {result['local_steps']} steps per round, "
                 f"{result['processes']} processes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local_steps", type=int, default=8)
    p.add_argument("--out", default=str(RESULTS_DIR))
    a = p.parse_args()
    common = ["--rounds", str(a.rounds), "--clients", str(a.clients), "--local_steps", str(a.local_steps),
              "--examples", str(16 * a.clients), "--strategy", "fedsmoothlora"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sequential", "data-parallel", "client-parallel"):
            runs.append(run_mode(mode, a.processes, common, Path(tmp) / mode))
            print(f"{mode:>16}: {runs[-1]['mean_round_s']:.2f} s/round "
                  f"(eval loss {runs[-1]['final_eval_loss']:.4f})", flush=True)
    seq, dp, cp = (r["mean_round_s"] for r in runs)
    result = {"processes": a.processes, "clients": a.clients, "local_steps": a.local_steps, "rounds": a.rounds,
              "cores": usable_cores(), "runs": runs,
              "client_parallel_vs_sequential": cp / seq, "client_parallel_vs_data_parallel": cp / dp,
              "same_result_as_sequential": runs[2]["final_sha256"] == runs[0]["final_sha256"]}
    print(f"client-parallel / sequential = {cp / seq:.2f}; client-parallel / data-parallel = {cp / dp:.2f}; "
          f"bit-identical to sequential: {result['same_result_as_sequential']}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "client_parallel.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "client_parallel.png")
    print(f"wrote {out / 'client_parallel.json'} and .png")


if __name__ == "__main__":
    main()
