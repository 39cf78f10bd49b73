"""Does FedSmoothLoRA's generation win hold at realistic local work? WordNet by category, 20 local steps.

The NLG recipe's offline task (SmolLM2-135M-Instruct learns WordNet glosses; 8 clients, one per
category, 4 per round: non-IID) at 20 local steps per round, 8 rounds, 200 held-out examples,
3 seeds; FedIT, FFA-LoRA, FlexLoRA, FedSmoothLoRA (defaults), FedSmoothLoRA with the
Gradient-Aligned start only (zeta = 0: no Round-Matching), and FedIT started once from peft's own
LoRA-GA (``init_lora_weights="lora_ga"``, calibrated at round 0 on examples the server holds).
Beside the loss, the final global model's greedy answers to the held-out prompts are scored by
ROUGE-L against the glosses (benchmarks/generation_quality.py).

Every run is its own process and one record in benchmarks/results/evidence_nlg.json, written as it
finishes; ``--resume`` continues, ``--report`` prints the table (mean +- std, rounds and wall time
to FedIT's final loss) and draws the PNG from what is there.

Usage::

    python benchmarks/evidence_nlg.py --resume      # the sweep (hours on 2 CPU cores), then the report
    python benchmarks/evidence_nlg.py --report      # table + PNG of the runs so far
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR  # noqa: E402
from benchmarks.evidence_suite.report import report  # noqa: E402
from benchmarks.evidence_suite.sweep import Sweep, run_sweep, timed_run  # noqa: E402

SETTING = {"num_clients": 8, "clients_per_round": 4, "num_rounds": 8, "local_steps": 20,
           "partition": "column", "partition_column": "category",
           "per_device_train_batch_size": 4, "per_device_eval_batch_size": 16, "max_eval_samples": 200,
           "ga_samples": 8, "ga_batch_size": 8, "max_length": 48, "target_modules": "q_proj,v_proj",
           "eval_rounds": 1, "save_rounds": -1, "rouge_new_tokens": 32}
CONFIGS = {
    "fedit": {"strategy": "fedit"},
    "fedsmoothlora": {"strategy": "fedsmoothlora"},
    "fedsmoothlora (GA only, zeta=0)": {"strategy": "fedsmoothlora", "zeta": 0.0},
    "fedit+lora_ga": {"strategy": "fedit", "init_lora_weights": "lora_ga", "server_calibration_samples": 64},
    "ffa_lora": {"strategy": "ffa_lora"},
    "flexlora": {"strategy": "flexlora"},
}
# the headline pair on every seed first, then the ablation and the new baseline, then the other baselines
TIERS = [["fedit", "fedsmoothlora"], ["fedsmoothlora (GA only, zeta=0)", "fedit+lora_ga"], ["ffa_lora", "flexlora"]]
SWEEP = Sweep(name="evidence_nlg", script=__file__, setting=SETTING, configs=CONFIGS, tiers=TIERS, seeds=3)


def recipe_argv(options: dict) -> list[str]:
    argv = []
    for key, value in options.items():
        argv += [f"--{key}", *str(value).split(",")] if key == "target_modules" else [f"--{key}", str(value)]
    return argv


def run_one(name: str, seed: int) -> dict:
    """One federation of configuration ``name``; returns its record."""
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback

    import recipes.nlg_llama as nlg
    from benchmarks.generation_quality import greedy_answers, mean_rouge_l
    from fedsmooth_hf import FederatedTrainer

    options = {k: v for k, v in {**SETTING, **CONFIGS[name]}.items() if k != "rouge_new_tokens"}
    with tempfile.TemporaryDirectory() as out:
        args, fed_args, method, md = nlg.parse_args(recipe_argv({**options, "seed": seed, "output_dir": out,
                                                                 "disable_tqdm": True, "use_cpu": True}))
        tokenizer = nlg.load_tokenizer(nlg.model_path(md))
        data = nlg.load_data(md, tokenizer, 0, keep=("category",))  # seed 0: every run sees the same examples
        _, eval_raw = nlg.load_raw_data(md, 0)

        def train() -> dict:
            set_seed(seed)
            built = nlg.build(args, fed_args, method, md, data=data)
            trainer = FederatedTrainer(**built.trainer_kwargs)
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            return {"trainer": trainer}

        record = timed_run(train)
        trainer = record.pop("trainer")
        prompts = [nlg.build_prompt(tokenizer, md, row[md.instruction_column], None) for row in eval_raw]
        with trainer.global_model() as model:
            answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=SETTING["rouge_new_tokens"])
    history = trainer.round_history
    evals = [r for r in history if "eval_loss" in r]
    trained, wall = [], 0.0
    for r in history:
        wall += r.get("round_time_s", 0.0) - r.get("eval_time_s", 0.0)
        trained.append(wall)
    return {**record, "strategy": name, "seed": seed, "local_steps": SETTING["local_steps"],
            "num_rounds": SETTING["num_rounds"], "eval_samples": len(data[1]),
            "final_eval_loss": evals[-1]["eval_loss"], "eval_loss": [r["eval_loss"] for r in evals],
            "train_wall_s": trained, "rouge_l": mean_rouge_l(answers, list(eval_raw[md.output_column])),
            "examples": [{"prompt": eval_raw[i][md.instruction_column], "answer": answers[i],
                          "reference": eval_raw[i][md.output_column]} for i in range(3)],
            "strategy_overhead_s": sum(r.get("strategy_overhead_s", 0.0) for r in history),
            "local_train_time_s": sum(r.get("local_train_time_s", 0.0) for r in history)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resume", action="store_true", help="keep the runs already in the JSON")
    p.add_argument("--report", action="store_true", help="only the table and the PNG of the runs so far")
    p.add_argument("--only", default=None, help="comma-separated configuration names to run")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the driver's per-run process
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--record", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one is not None:
        Path(a.record).write_text(json.dumps(run_one(a.one, a.seed)))
        return
    if not a.report:
        run_sweep(SWEEP, a.resume, a.only.split(",") if a.only else None)
    report(SWEEP, title=f"WordNet by category, SmolLM2-135M: {SETTING['num_clients']} clients "
                        f"({SETTING['clients_per_round']}/round), {SETTING['local_steps']} local steps, "
                        f"{SETTING['max_eval_samples']} eval samples")
    print(f"wrote {RESULTS_DIR / 'evidence_nlg.json'} (.md, .png)")


if __name__ == "__main__":
    main()
