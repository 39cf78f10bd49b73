"""The convergence sweep: its command line, one run, resuming from a results JSON, and the sweep loop.

Results go to ``<out-dir>/convergence_<task>[_cuda].json`` after every run, so an interrupted sweep
continues with ``--resume``: the runs already in the JSON are kept when its recipe options equal
the sweep's, and only the missing ones run. An ablation reuses its main sweep's FedIT and default
FedSmoothLoRA runs (``reuses`` in `settings.TASKS`) instead of repeating them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers.trainer_callback import PrinterCallback

from benchmarks._common import RESULTS_DIR
from benchmarks._common import machine as common_machine
from benchmarks.convergence_suite.analysis import format_markdown, format_table, summarize
from benchmarks.convergence_suite.plots import plot
from benchmarks.convergence_suite.settings import QUICK, STRATEGIES, TASKS
from benchmarks.convergence_suite.tasks import make_task
from fedsmooth_hf import FederatedCallback, available_strategies

ROUND_KEYS = ("round", "eval_loss", "eval_accuracy", "train_loss", "zeta", "rm_kept_median")


class ClientLossRecorder(FederatedCallback):
    """Every logged training loss of every client round (run with `logging_steps=1`).

    The trainer's `round_history` keeps one first loss and one mean loss per client round;
    the inter-round jump needs the last loss of a client's previous round, so the whole trace is kept.
    """

    def __init__(self):
        self.traces: list[dict] = []
        self._current: dict | None = None

    def on_client_begin(self, args, state, control, round, client, **kwargs):
        self._current = {"round": round, "client": client, "losses": []}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._current is not None and logs and "loss" in logs:
            self._current["losses"].append(float(logs["loss"]))

    def on_client_end(self, args, state, control, round, client, metrics, **kwargs):
        if self._current is not None and self._current["losses"]:
            self.traces.append(self._current)
        self._current = None


def run_one(task, options: dict, seed: int) -> dict:
    """Runs one federation and returns its record.

    Args:
        task (`tasks.RecipeTask`): Builds the run through its recipe.
        options (`dict`): Recipe arguments of the run (task, partition and strategy or variant together).
        seed (`int`): The run's seed.

    Returns:
        `dict`: per-round eval measures with the training wall time so far (`rounds`), every client
        round's per-step losses (`client_traces`), timings and what the run was (`task_info`).
    """
    recorder = ClientLossRecorder()
    with tempfile.TemporaryDirectory(prefix="convergence_") as out_dir:
        run = task.build(options, seed, out_dir)
        # the sweep prints one line per run, not the recipe's per round
        trainer = run.make_trainer(callbacks=[recorder])
        trainer.remove_callback(PrinterCallback)  # logging_steps=1 would print every step
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    history = trainer.round_history
    rounds, trained_s = [], 0.0
    for r in history:
        # wall time of the rounds so far without their evaluations: local training, starts, server merge
        trained_s += r.get("round_time_s", 0.0) - r.get("eval_time_s", 0.0)
        if "eval_loss" in r:
            rounds.append({**{k: r[k] for k in ROUND_KEYS if k in r}, "train_wall_s": trained_s})
    return {
        "rounds": rounds,
        "client_traces": recorder.traces,
        "wall_s": wall,
        "strategy_overhead_s": sum(r.get("strategy_overhead_s", 0.0) for r in history),
        "local_train_time_s": sum(r.get("local_train_time_s", 0.0) for r in history),
        "task_info": run.describe(),
    }


def machine() -> dict:
    """What the sweep's seconds were measured on, with the load average at its start."""
    return {**common_machine(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "note": "shared machine: wall times were measured under load from other jobs"}


def runs_reused_from(path: Path, options: dict, partitions: dict, configs: dict, seeds: int) -> list[dict]:
    """Returns the main sweep's runs an ablation reuses: its default variant and, if listed, its FedIT.

    Args:
        path (`Path`): The main sweep's results JSON.
        options (`dict`): The ablation's recipe options; a sweep with other options gives nothing.
        partitions (`dict`): The partitions wanted.
        configs (`dict`): The ablation's variants (name -> options).
        seeds (`int`): Seeds `0 .. seeds - 1` are wanted.
    """
    sweep = json.loads(path.read_text())
    if sweep["settings"]["recipe_options"] != options:
        return []
    names = {}
    for name, config in configs.items():
        if config == {"strategy": "fedsmoothlora"}:
            names["fedsmoothlora"] = name
        elif config == {"strategy": "fedit"}:
            names["fedit"] = name
    return [{**r, "name": names[r["name"]], "reused_from": path.name} for r in sweep["runs"]
            if r["name"] in names and r["partition"] in partitions and r["seed"] < seeds]


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The sweep's command line (`python benchmarks/convergence.py --help`)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--quick", action="store_true", help=f"{QUICK['num_rounds']} rounds, fedit + fedsmoothlora, 1 seed")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default per task)")
    p.add_argument("--rounds", type=int, default=None, help="communication rounds (default per task)")
    p.add_argument("--strategies", default=None, help=f"comma-separated (default: {','.join(STRATEGIES)})")
    p.add_argument("--partitions", default=None, help="comma-separated subset of the task's partitions")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe/federated argument, e.g. --set local_steps=10")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the runs train; results of a cuda sweep go to convergence_<task>_cuda.json")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--resume", action="store_true",
                   help="keep finished runs from an existing JSON with the same settings")
    p.add_argument("--report-only", action="store_true", help="no new runs: table and plot from the existing JSON")
    return p


def sweep_plan(a: argparse.Namespace, spec: dict) -> tuple[dict, int, dict, dict]:
    """Returns `(options, seeds, partitions, configs)` of the sweep the command line asks for."""
    options = dict(spec["recipe"])
    seeds = a.seeds or (QUICK["seeds"] if a.quick else spec["seeds"])
    if a.quick:
        options["num_rounds"] = QUICK["num_rounds"]
    if a.rounds:
        options["num_rounds"] = a.rounds
    for item in a.set:
        key, _, value = item.partition("=")
        options[key] = value
    partitions = {k: v for k, v in spec["partitions"].items()
                  if a.partitions is None or k in a.partitions.split(",")}
    if "variants" in spec:
        configs = {name: {"strategy": "fedsmoothlora", **over} for name, over in spec["variants"].items()}
        return options, seeds, partitions, dict(list(configs.items())[:2]) if a.quick else configs
    names = (a.strategies.split(",") if a.strategies
             else QUICK["strategies"] if a.quick else spec.get("strategies", STRATEGIES))
    unknown = set(names) - set(available_strategies())
    if unknown:
        raise SystemExit(f"--strategies: unknown {sorted(unknown)}; available: {available_strategies()}")
    return options, seeds, partitions, {name: {"strategy": name} for name in names}


def kept_runs(a, json_path: Path, parent: Path | None, options: dict, partitions: dict, configs: dict,
              seeds: int) -> list[dict]:
    """The runs that need not run again: the main sweep's (for an ablation) and, with `--resume`, the JSON's own."""
    runs: list[dict] = []
    if parent is not None and parent.exists():
        runs += runs_reused_from(parent, options, partitions, configs, seeds)
    if (a.resume or a.report_only) and json_path.exists():
        old = json.loads(json_path.read_text())
        if old["settings"]["recipe_options"] == options:
            kept = {(r["name"], r["partition"], r["seed"]) for r in runs}
            runs += [r for r in old["runs"] if r["name"] in configs and r["partition"] in partitions
                     and (r["name"], r["partition"], r["seed"]) not in kept]
            print(f"[convergence] resuming: {len(runs)} runs kept from {json_path}", flush=True)
    return runs


def main(argv: list[str] | None = None, description: str | None = None) -> dict:
    """Runs (or resumes, or only reports) one sweep; returns the results JSON's content."""
    a = build_parser(description).parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    spec = TASKS[a.task]
    options, seeds, partitions, configs = sweep_plan(a, spec)
    out_dir, suffix = Path(a.out_dir), "_cuda" if a.device == "cuda" else ""
    json_path = out_dir / f"convergence_{a.task}{suffix}.json"
    settings = {"task": a.task, "device": a.device, "recipe_options": options, "partitions": partitions,
                "seeds": list(range(seeds)), "configs": configs, "quick": a.quick, "threads": torch.get_num_threads()}
    if a.report_only and not json_path.exists():
        raise SystemExit(f"--report-only: no results at {json_path} (run the sweep first)")
    parent = out_dir / f"convergence_{spec['reuses']}{suffix}.json" if "reuses" in spec else None
    runs = kept_runs(a, json_path, parent, options, partitions, configs, seeds)
    done = {(r["name"], r["partition"], r["seed"]) for r in runs}
    task = make_task(a.task, a.device)
    metric = spec["metric"]
    result = {"benchmark": "convergence", "settings": settings, "machine": machine()}
    t_start = time.perf_counter()
    skip = set(spec.get("skip", []))
    total = (len(configs) * len(partitions) - len(skip & {(n, p) for n in configs for p in partitions})) * seeds
    # seeds outermost: an interrupted sweep still has every strategy side by side
    for seed in ([] if a.report_only else range(seeds)):
        for partition, part_options in partitions.items():
            for name, config in configs.items():
                if (name, partition, seed) in done or (name, partition) in skip:
                    continue
                if parent is not None and parent.exists():  # the main sweep may have finished it meanwhile
                    landed = [r for r in runs_reused_from(parent, options, {partition: part_options},
                                                          {name: config}, seeds) if r["seed"] == seed]
                    if landed:
                        runs += landed
                        continue
                run = run_one(task, {**options, **part_options, **config}, seed)
                run.update(name=name, partition=partition, seed=seed, options=config)
                runs.append(run)
                final = run["rounds"][-1]
                print(f"[convergence] {len(runs)}/{total} {partition} {name} seed {seed}: "
                      f"{metric}={final[metric]:.4f} eval_loss={final['eval_loss']:.4f} ({run['wall_s']:.0f} s)",
                      flush=True)
                result.update(runs=runs, summary=summarize(runs, metric))
                out_dir.mkdir(parents=True, exist_ok=True)
                json_path.write_text(json.dumps(result, indent=1) + "\n")
    result.update(runs=runs, summary=summarize(runs, metric), total_time_s=time.perf_counter() - t_start)
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result["summary"], metric))
    json_path.with_suffix(".md").write_text(format_markdown(result["summary"], metric))
    info = runs[0]["task_info"]
    title = (f"{a.task}: {info['model']}\non {info['data']} ({info['train']} train / {info['eval']} eval),\n"
             f"{options['num_clients']} clients ({options.get('clients_per_round', 'all or per partition')}/round), "
             f"{options['num_rounds']} rounds x {options['local_steps']} steps x batch "
             f"{options['per_device_train_batch_size']};\nmean over seeds, shaded min..max")
    png = plot(runs, metric, title, json_path.with_suffix(".png"))
    print(f"wrote {json_path} and {png}")
    return result
