"""What every benchmark script sets up the same way: offline Hub, the results folder, the machine.

Imported before ``transformers`` (``HF_HUB_OFFLINE`` is read at import): a script puts the
repository root on ``sys.path`` and imports this module first. Plots come from ``recipes.plots``,
shared with the recipes.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is empty on most Linux machines)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (``taskset`` and cgroups included), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load average: other jobs on a small machine inflate every timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine() -> dict:
    """What a result's seconds were measured on."""
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "loadavg": loadavg()}

