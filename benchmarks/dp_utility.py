"""Client-level DP on the NLG task: held-out loss against epsilon, FedIT vs FFA-LoRA vs FedSmoothLoRA.

The NLG recipe's offline setting (SmolLM2-135M-Instruct, WordNet definitions) split IID over many
simulated clients (default 120, about 10 per round by Poisson sampling), each strategy at
epsilon in {inf, 30, 8, 3} (delta 1e-5, the noise calibrated to the planned rounds; inf is the
plain run), several seeds. Every run is one record in the JSON, written as it finishes, so
``--resume`` continues an interrupted sweep. It also prints each strategy's per-round server
seconds with and without DP (the release replaces the aggregate; the clients' work is unchanged).

Usage::

    python benchmarks/dp_utility.py --resume            # the sweep (hours on 2 CPU cores)
    python benchmarks/dp_utility.py --quick             # a tiny slice, minutes
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, machine  # noqa: E402
from recipes.plots import pyplot, save  # noqa: E402

# isort: split
from transformers.trainer_callback import PrinterCallback  # noqa: E402

import recipes.nlg_llama as nlg  # noqa: E402
from fedsmooth_hf import FederatedTrainer  # noqa: E402

STRATEGIES = ("fedit", "ffa_lora", "fedsmoothlora")
EPSILONS = (math.inf, 30.0, 8.0, 3.0)
#: the recipe's arguments of every run (the recipe's defaults beneath them)
SETTING = {"num_clients": 120, "clients_per_round": 10, "partition": "iid", "num_rounds": 5, "local_steps": 3,
           "max_eval_samples": 100, "eval_rounds": 1, "save_rounds": -1, "ga_samples": 8,
           "dp_delta": 1e-5, "dp_clip_norm": 1.0, "dp_clipping": "adaptive"}
QUICK = {**SETTING, "num_clients": 100, "num_rounds": 2, "local_steps": 1, "max_eval_samples": 16,
         "max_train_samples": 400}


def argv_of(options: dict) -> list[str]:
    return [token for key, value in options.items() for token in (f"--{key}", str(value))]


def run_one(strategy: str, epsilon: float, seed: int, setting: dict, data) -> dict:
    """One federation; returns its record (held-out loss per round, epsilon spent, seconds)."""
    private = {k: v for k, v in setting.items() if k.startswith("dp_")}
    options = {k: v for k, v in setting.items() if not k.startswith("dp_")}
    if math.isfinite(epsilon):
        options.update(private, dp_target_epsilon=epsilon)
    with tempfile.TemporaryDirectory() as out:
        args, fed_args, method, md = nlg.parse_args(argv_of({**options, "strategy": strategy, "seed": seed,
                                                             "output_dir": out, "disable_tqdm": True,
                                                             "use_cpu": True, "report_to": "none"}))
        built = nlg.build(args, fed_args, method, md, data=data)
        trainer = FederatedTrainer(**built.trainer_kwargs)
        trainer.remove_callback(PrinterCallback)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    history = trainer.round_history
    evals = [r for r in history if "eval_loss" in r]
    trained = [r for r in history if r.get("round", 0) > 0]
    return {"strategy": strategy, "epsilon": epsilon if math.isfinite(epsilon) else "inf", "seed": seed,
            "final_eval_loss": evals[-1]["eval_loss"], "eval_loss": [r["eval_loss"] for r in evals],
            "dp_epsilon": trained[-1].get("dp_epsilon"), "noise_multiplier": None if trainer.privacy is None
            else trainer.privacy.noise_multiplier, "clients_per_round": [r.get("dp_clients", len(r["clients"]))
                                                                           for r in trained],
            "wall_s": wall, "server_s": [r["round_time_s"] - r["local_train_time_s"] - r["strategy_overhead_s"]
                                         - r.get("eval_time_s", 0.0) for r in trained]}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the JSON")
    parser.add_argument("--out", default=None)
    a = parser.parse_args(argv)
    setting = QUICK if a.quick else SETTING
    out = Path(a.out or RESULTS_DIR / ("dp_utility_quick.json" if a.quick else "dp_utility.json"))
    done = json.loads(out.read_text())["runs"] if a.resume and out.exists() else []
    key = lambda r: (r["strategy"], str(r["epsilon"]), r["seed"])  # noqa: E731
    have = {key(r) for r in done}
    args, _, _, md = nlg.parse_args(argv_of({k: v for k, v in setting.items() if not k.startswith("dp_")}))
    data = nlg.load_data(md, nlg.load_tokenizer(nlg.model_path(md)), 0, keep=())
    for seed in range(a.seeds):
        for epsilon in EPSILONS:
            for strategy in STRATEGIES:
                if (strategy, str(epsilon if math.isfinite(epsilon) else "inf"), seed) in have:
                    continue
                record = run_one(strategy, epsilon, seed, setting, data)
                done.append(record)
                print(f"{strategy:>14} eps={record['epsilon']!s:>4} seed={seed}: final eval loss "
                      f"{record['final_eval_loss']:.3f} (epsilon spent {record['dp_epsilon']}, "
                      f"{record['wall_s']:.0f} s)", flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"machine": machine(), "setting": setting, "runs": done}, indent=1))
    plot(done, out.with_suffix(".png"))
    return done


def plot(runs: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    labels = [str(e if math.isfinite(e) else "inf") for e in EPSILONS]
    for strategy in STRATEGIES:
        means = []
        for label in labels:
            losses = [r["final_eval_loss"] for r in runs if r["strategy"] == strategy and str(r["epsilon"]) == label]
            means.append(sum(losses) / len(losses) if losses else float("nan"))
        ax.plot(labels, means, marker="o", label=strategy)
    start = [r["eval_loss"][0] for r in runs]
    if start:
        ax.axhline(sum(start) / len(start), ls="--", c="gray", label="before training")
    ax.set(xlabel="epsilon (delta 1e-5)", ylabel="final held-out loss", title="Client-level DP, NLG task")
    ax.legend()
    save(fig, path)


if __name__ == "__main__":
    main()
