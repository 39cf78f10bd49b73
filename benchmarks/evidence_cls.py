"""Classification at realistic local work: SmolLM2 label skew (Dirichlet 0.1, 10 clients), 20 local steps.

The LM-classification recipe's offline task (SmolLM2-135M's first 6 layers with a new head reads a
WordNet word and gloss and predicts one of ten categories; LoRA on q_proj/v_proj, the head trained
in full) split over 10 clients by a Dirichlet(0.1) draw over the labels, 8 rounds x 20 local steps,
3 seeds: FedIT, FedSmoothLoRA with its defaults, and FedIT started from peft's LoRA-GA (calibrated
at round 0 on examples the server holds). One record per run in benchmarks/results/evidence_cls.json.

Usage::

    python benchmarks/evidence_cls.py --resume   # the sweep (hours on 2 CPU cores), then the report
    python benchmarks/evidence_cls.py --report   # table + PNG of the runs so far
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402, F401  (offline Hub before transformers is imported)
from benchmarks.convergence_suite.settings import TASKS  # noqa: E402
from benchmarks.evidence_suite.runs import run_lm_classification  # noqa: E402
from benchmarks.evidence_suite.sweep import Sweep, cli  # noqa: E402

#: lm-cls's recipe arguments (benchmarks/convergence_suite/settings.py) at 20 local steps, label skew
SETTING = {**{k: ",".join(v) if isinstance(v, list) else v for k, v in TASKS["lm-cls"]["recipe"].items()},
           "local_steps": 20, "partition": "dirichlet", "dirichlet_alpha": 0.1, "partition_column": "label",
           "eval_rounds": 1, "save_rounds": -1}
CONFIGS = {
    "fedit": {"strategy": "fedit"},
    "fedsmoothlora": {"strategy": "fedsmoothlora"},
    "fedit+lora_ga": {"strategy": "fedit", "init_lora_weights": "lora_ga", "server_calibration_samples": 64},
}
SWEEP = Sweep(name="evidence_cls", script=__file__, setting=SETTING, configs=CONFIGS,
              tiers=[["fedit", "fedsmoothlora"], ["fedit+lora_ga"]], seeds=3, metric="eval_accuracy")
TITLE = "SmolLM2-135M label skew (Dirichlet 0.1, 10 clients), 20 local steps"


def run_one(name: str, seed: int, setting: dict = SETTING) -> dict:
    """One federation of configuration ``name`` (a key of `CONFIGS`) at ``setting``; returns its record."""
    return run_lm_classification(name, {**setting, **CONFIGS[name]}, seed)


if __name__ == "__main__":
    cli(SWEEP, run_one, TITLE)
