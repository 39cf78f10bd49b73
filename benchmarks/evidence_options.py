"""The options users reach for next, at realistic local work: FedProx and server optimizers, FedIT and FedSmoothLoRA.

The setting of benchmarks/evidence_nlg.py (WordNet by category, SmolLM2-135M, 8 clients, 4 per round,
20 local steps, 8 rounds, 200 held-out examples), 2 seeds: FedProx at ``prox_mu`` 0.01 and 0.1 on
both strategies; the server optimizers on FedIT (FedAvgM, FedAdam, FedYogi, each at two server
learning rates; the package's defaults are 1.0 for FedAvgM and 0.01 for the adaptive ones) and on
FedSmoothLoRA (FedAvgM only: a strategy that merges a low-rank product takes
no adaptive server step). The plain FedIT and FedSmoothLoRA runs are evidence_nlg's (same setting,
seeds 0 and 1), not repeated. One record per run in benchmarks/results/evidence_options.json.

Usage::

    python benchmarks/evidence_options.py --resume   # the sweep (hours on 2 CPU cores), then the report
    python benchmarks/evidence_options.py --report   # table + PNG of the runs so far
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402, F401  (offline Hub before transformers is imported)
from benchmarks.evidence_nlg import SETTING  # noqa: E402
from benchmarks.evidence_suite.runs import run_nlg  # noqa: E402
from benchmarks.evidence_suite.sweep import Sweep, cli  # noqa: E402

CONFIGS = {
    "fedit": {"strategy": "fedit"},
    "fedsmoothlora": {"strategy": "fedsmoothlora"},
    **{f"{s} prox_mu={mu}": {"strategy": s, "prox_mu": mu} for s in ("fedit", "fedsmoothlora") for mu in (0.01, 0.1)},
    **{f"{s} avgm lr={lr}": {"strategy": s, "server_optimizer": "avgm", "server_lr": lr}
       for s in ("fedit", "fedsmoothlora") for lr in (0.1, 1.0)},
    **{f"fedit {opt} lr={lr}": {"strategy": "fedit", "server_optimizer": opt, "server_lr": lr}
       for opt in ("adam", "yogi") for lr in (0.001, 0.01)},
}
# what a user would try first on both seeds (the package's default server lrs, FedAvgM at the average's own
# step size: momentum 0.9 makes lr 1.0 a 10x steady step), then the grid's other points
FIRST = ["fedit avgm lr=0.1", "fedsmoothlora avgm lr=0.1", "fedit adam lr=0.01", "fedit yogi lr=0.01",
         "fedit prox_mu=0.1", "fedsmoothlora prox_mu=0.1", "fedit avgm lr=1.0", "fedsmoothlora avgm lr=1.0",
         "fedit adam lr=0.001"]
THEN = ["fedit yogi lr=0.001", "fedit prox_mu=0.01", "fedsmoothlora prox_mu=0.01"]
TIERS = [FIRST, THEN]
SWEEP = Sweep(name="evidence_options", script=__file__, setting=SETTING, configs=CONFIGS, tiers=TIERS, seeds=2,
              reuses={"fedit": ("evidence_nlg", "fedit"), "fedsmoothlora": ("evidence_nlg", "fedsmoothlora")})
TITLE = "FedProx and server optimizers at 20 local steps (WordNet by category, SmolLM2-135M)"


def run_one(name: str, seed: int, setting: dict = SETTING) -> dict:
    """One federation of configuration ``name`` (a key of `CONFIGS`) at ``setting``; returns its record."""
    options = {k: v for k, v in {**setting, **CONFIGS[name]}.items() if k != "rouge_new_tokens"}
    return run_nlg(name, options, seed, rouge_new_tokens=setting["rouge_new_tokens"])


if __name__ == "__main__":
    cli(SWEEP, run_one, TITLE)
