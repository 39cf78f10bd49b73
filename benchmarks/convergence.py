"""Does FedSmoothLoRA converge smoother and faster than the baselines? Side by side, on real data.

Every strategy runs on the same data, partition, model and TrainingArguments for each seed;
only ``--strategy`` (or, for the ablation, a FedSmoothLoRA option) changes. Per round it records
the global model's eval loss (and accuracy), and every client's per-step training loss
(``logging_steps=1`` and a :class:`ClientLossRecorder` callback), from which it derives:

* final metric, mean +- std over seeds;
* rounds to reach FedIT's final metric (FedIT's mean over seeds, same partition);
* smoothness: mean |eval_loss[t] - eval_loss[t-1]| over rounds t >= 2 (the first round's
  large drop is left out), and the number of rounds in which accuracy fell;
* inter-round client loss jump: a client's first training loss in a round minus its last
  training loss in its previous participation (signed mean and mean of the absolute value).

Tasks (each builds its runs through its recipe's ``build``: recipes/vit_classification.py,
recipes/nlg_llama.py, recipes/lm_classification.py)::

    python benchmarks/convergence.py --task vit            # Fashion-MNIST, small digits-pretrained ViT
    python benchmarks/convergence.py --task vit-ablation   # FedSmoothLoRA variants, Dirichlet 0.1
    python benchmarks/convergence.py --task nlg            # SmolLM2-135M, WordNet definitions
    python benchmarks/convergence.py --task nlg8           # the same over 8 rounds, 8 clients, 3 seeds
    python benchmarks/convergence.py --task nlg8-ablation  # FedSmoothLoRA variants on nlg8
    python benchmarks/convergence.py --task lm-cls         # SmolLM2-135M + new head, 10 WordNet categories
    python benchmarks/convergence.py --task lm-cls-ablation  # FedSmoothLoRA variants on lm-cls, label skew
    python benchmarks/convergence.py --task tiny           # tiny ViT from scratch on sklearn digits (seconds)
    python benchmarks/convergence.py --task vit --quick    # few rounds, 2 strategies, 1 seed

Results: ``benchmarks/results/convergence_<task>.json``, ``.md`` and ``.png``. ``--resume`` keeps the
runs already in the JSON (same settings) and only runs the missing ones, so a long sweep can be
continued after an interruption. The parts live in benchmarks/convergence_suite/: ``settings``
(the tasks' arguments and sweep sizes), ``tasks`` (building a run through a recipe), ``runner``
(one run, resuming, the sweep), ``analysis`` (the figures and tables) and ``plots``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks._common  # noqa: E402, F401  (offline Hub before transformers is imported)

# isort: split

from benchmarks.convergence_suite.analysis import (  # noqa: E402, F401
    client_loss_jumps,
    rounds_to_reach,
    run_metrics,
    seconds_to_reach,
    summarize,
)
from benchmarks.convergence_suite.runner import ClientLossRecorder, run_one  # noqa: E402, F401
from benchmarks.convergence_suite.runner import main as run_sweep  # noqa: E402
from benchmarks.convergence_suite.settings import LM_CLS_CATEGORIES, STRATEGIES, TASKS  # noqa: E402, F401


def main(argv: list[str] | None = None) -> dict:
    """Runs the sweep of ``argv`` (``sys.argv`` by default); returns its results JSON's content."""
    return run_sweep(argv, description=__doc__)


if __name__ == "__main__":
    main()
