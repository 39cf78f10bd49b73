"""The evidence sweeps' driver: one recipe run per subprocess, one record per run, resumable, then a report.

Each run is a fresh ``python benchmarks/<script>.py --one NAME --seed S --record PATH`` process: a
crash or an out-of-memory kill loses that run only, the driver notes it and goes on, and
``--resume`` retries it. Records land in the results JSON as each run finishes. Runs are ordered
by tier, then seed, then configuration, so an interrupted sweep has its first tier on every seed
side by side before the next tier starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._common import RESULTS_DIR, loadavg, machine


@dataclass
class Sweep:
    """One evidence sweep.

    Args:
        name (`str`): Results go to ``benchmarks/results/<name>.json`` (``.md``, ``.png``).
        script (`str`): The entry script, run with ``--one`` for each run.
        setting (`dict`): Recipe arguments shared by every run (recorded in the JSON; ``--resume``
            keeps a JSON's runs only when its setting is the same).
        configs (`dict`): Configuration name (as the user names it) -> recipe arguments of that run.
        tiers (`list[list[str]]`): Configuration names in the order they run (each tier over every seed).
        seeds (`int`): Seeds ``0 .. seeds - 1``.
        reference (`str`): The configuration whose mean final measure the others must reach.
        metric (`str`): The held-out measure compared: ``"eval_loss"`` (lower is better) or ``"eval_accuracy"``.
        reuses (`dict`): Configuration name -> ``(sweep name, its configuration name)``: runs of the same
            setting that another sweep already made (its baselines), taken instead of repeated.
        out_dir (`Path`): Where the results go (default benchmarks/results).
    """

    name: str
    script: str
    setting: dict
    configs: dict
    tiers: list[list[str]]
    seeds: int = 3
    reference: str = "fedit"
    metric: str = "eval_loss"
    reuses: dict = field(default_factory=dict)
    out_dir: Path = RESULTS_DIR

    @property
    def path(self) -> Path:
        return self.out_dir / f"{self.name}.json"

    def planned(self) -> list[tuple[str, int]]:
        """``(configuration, seed)`` of every run this sweep makes itself, in the order they run."""
        return [(name, seed) for tier in self.tiers for seed in range(self.seeds) for name in tier
                if name not in self.reuses]

    def reused(self) -> list[dict]:
        """The runs of :attr:`reuses` that exist and were measured with this sweep's setting."""
        out = []
        for name, (source, source_name) in self.reuses.items():
            path = self.out_dir / f"{source}.json"
            if not path.exists():
                continue
            other = json.loads(path.read_text())
            if other.get("setting") != self.setting:
                continue
            out += [{**r, "strategy": name, "reused_from": source} for r in other["runs"]
                    if r["strategy"] == source_name and r["seed"] < self.seeds]
        return out


def load(sweep: Sweep, resume: bool) -> list[dict]:
    """The runs already done: the JSON's own when ``resume`` and its setting equals the sweep's."""
    if not (resume and sweep.path.exists()):
        return []
    old = json.loads(sweep.path.read_text())
    if old.get("setting") != sweep.setting:
        raise SystemExit(f"--resume: {sweep.path} was measured with another setting; move it away to start anew")
    return old["runs"]


def write(sweep: Sweep, runs: list[dict], summary: list[dict] | None = None) -> None:
    sweep.path.parent.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": sweep.name, "machine": machine(), "setting": sweep.setting, "configs": sweep.configs,
            "runs": runs, "summary": summary}
    tmp = sweep.path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(tmp, sweep.path)  # a kill mid-write never leaves half a JSON


def run_sweep(sweep: Sweep, resume: bool, only: list[str] | None = None) -> list[dict]:
    """Runs every planned (configuration, seed) not yet in the JSON, each in its own process."""
    runs = [r for r in load(sweep, resume) if "reused_from" not in r]
    done = {(r["strategy"], r["seed"]) for r in runs}
    todo = [(n, s) for n, s in sweep.planned() if (n, s) not in done and (only is None or n in only)]
    print(f"[{sweep.name}] {len(runs)} runs kept, {len(todo)} to run", flush=True)
    for i, (name, seed) in enumerate(todo, start=1):
        with tempfile.TemporaryDirectory(prefix=f"{sweep.name}_") as tmp:
            record_path = Path(tmp) / "record.json"
            cmd = [sys.executable, sweep.script, "--one", name, "--seed", str(seed), "--record", str(record_path)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not record_path.exists():
                print(f"[{sweep.name}] {i}/{len(todo)} {name} seed {seed} FAILED (exit {proc.returncode}, "
                      f"{time.perf_counter() - t0:.0f} s); --resume retries it. stderr tail:\n"
                      + "\n".join(proc.stderr.splitlines()[-15:]), flush=True)
                continue
            record = json.loads(record_path.read_text())
        runs.append(record)
        write(sweep, runs)
        print(f"[{sweep.name}] {i}/{len(todo)} {name} seed {seed}: final {sweep.metric} "
              f"{record['final_' + sweep.metric]:.4f} "
              f"({record['wall_s']:.0f} s, load {record['loadavg_end']})", flush=True)
    return runs


def cli(sweep: Sweep, run_one: Callable[[str, int], dict], title: str, argv: list[str] | None = None) -> None:
    """The command line every evidence script shares: the sweep, ``--resume``, ``--report``, ``--only``.

    Args:
        sweep (`Sweep`): What to run.
        run_one (`Callable[[str, int], dict]`): ``(configuration name, seed) -> record``, run in a child process.
        title (`str`): The figure's title.
        argv (`list[str]`, *optional*): The arguments (default ``sys.argv[1:]``).
    """
    import argparse

    from .report import report

    p = argparse.ArgumentParser(description=title)
    p.add_argument("--resume", action="store_true", help="keep the runs already in the JSON")
    p.add_argument("--report", action="store_true", help="only the table and the PNG of the runs so far")
    p.add_argument("--only", default=None, help="comma-separated configuration names to run")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the driver's per-run child process
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--record", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one is not None:
        Path(a.record).write_text(json.dumps(run_one(a.one, a.seed)))
        return
    if not a.report:
        run_sweep(sweep, a.resume, a.only.split(",") if a.only else None)
    report(sweep, title)
    print(f"wrote {sweep.path} (.md, .png)")


def timed_run(build_and_train: Callable[[], dict]) -> dict:
    """Runs ``build_and_train`` with the wall and process-CPU seconds and the load before and after."""
    start_load, t0, c0 = loadavg(), time.perf_counter(), time.process_time()
    record = build_and_train()
    record.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
                  loadavg_start=start_load, loadavg_end=loadavg())
    return record
