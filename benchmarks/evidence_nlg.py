"""Does FedSmoothLoRA's generation win hold at realistic local work? WordNet by category, 20 local steps.

The NLG recipe's offline task (SmolLM2-135M-Instruct learns WordNet glosses; 8 clients, one per
category, 4 per round: non-IID) at 20 local steps per round, 8 rounds, 200 held-out examples,
3 seeds; FedIT, FFA-LoRA, FlexLoRA, FedSmoothLoRA (defaults but ga_samples=8), FedSmoothLoRA with the
Gradient-Aligned start only (zeta = 0: no Round-Matching), and FedIT started once from peft's own
LoRA-GA (``init_lora_weights="lora_ga"``, calibrated at round 0 on 64 examples the server holds);
last, FedSmoothLoRA calibrating on 64 examples per client round (the package default; the setting's
8 is a CPU cut inherited from the earlier 3-step sweep).
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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402, F401  (offline Hub before transformers is imported)
from benchmarks.evidence_suite.runs import run_nlg  # noqa: E402
from benchmarks.evidence_suite.sweep import Sweep, cli  # noqa: E402

#: the NLG recipe's arguments of every run; `rouge_new_tokens` is the length of the scored answers
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
    # the setting's ga_samples=8 is nlg8's CPU cut; the package default is 64, as many as LoRA-GA's server sample
    "fedsmoothlora (ga_samples=64)": {"strategy": "fedsmoothlora", "ga_samples": 64},
}
# the headline pair on every seed first, then the ablation and the new baseline, then the other baselines
TIERS = [["fedit", "fedsmoothlora"], ["fedsmoothlora (GA only, zeta=0)", "fedit+lora_ga"], ["ffa_lora", "flexlora"],
         ["fedsmoothlora (ga_samples=64)"]]
SWEEP = Sweep(name="evidence_nlg", script=__file__, setting=SETTING, configs=CONFIGS, tiers=TIERS, seeds=3)
TITLE = (f"WordNet by category, SmolLM2-135M: {SETTING['num_clients']} clients ({SETTING['clients_per_round']}"
         f"/round), {SETTING['local_steps']} local steps, {SETTING['max_eval_samples']} eval samples")


def run_one(name: str, seed: int, setting: dict = SETTING) -> dict:
    """One federation of configuration ``name`` (a key of `CONFIGS`) at ``setting``; returns its record."""
    options = {k: v for k, v in {**setting, **CONFIGS[name]}.items() if k != "rouge_new_tokens"}
    return run_nlg(name, options, seed, rouge_new_tokens=setting["rouge_new_tokens"])


if __name__ == "__main__":
    cli(SWEEP, run_one, TITLE)
