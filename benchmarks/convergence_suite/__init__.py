"""The parts of benchmarks/convergence.py: settings, tasks, runner, analysis and plots."""

import benchmarks._common  # noqa: F401  (offline Hub before any part imports transformers)
