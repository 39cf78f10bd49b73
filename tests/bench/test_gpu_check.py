"""``benchmarks/gpu_check.py --cpu-small``: the GPU check's code path, on a small Llama on the CPU.

The GPU run (1B shapes, bf16) cannot run in CI; this runs every part of it (federated runs vs a plain
Trainer, the GA start vs a plain forward+backward, the 4-bit path) at a size of seconds and checks that
the JSON holds the figures the table prints, each a real measurement.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_small_measures_every_part(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-small", "--out-dir",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check_cpu_small.json").read_text())
    assert result["ok"] and result["device"] == "cpu" and result["settings"]["cpu_small"]
    assert result["settings"]["dtype"] == "float32"

    fed = result["federated"]
    settings = result["settings"]
    for name in ("plain", "fedit", "fedsmoothlora"):
        assert len(fed["runs"][name]) == settings["repeats"]
        assert fed["median"][name]["wall_s"] > 0
    assert math.isclose(fed["fedsmoothlora_vs_fedit_wall"],
                        fed["median"]["fedsmoothlora"]["wall_s"] / fed["median"]["fedit"]["wall_s"])
    assert fed["median"]["fedsmoothlora"]["strategy_overhead_s"] > fed["median"]["fedit"]["strategy_overhead_s"]
    assert all(v > 0 for v in fed["client_step_tokens_per_s_vs_plain"].values())

    ga = result["ga_start"]
    assert ga["time_ratio"] > 0 and len(ga["seconds"]["ga_start"]) >= 2
    assert ga["peak_bytes_above_model"]["plain_fwd_bwd"] > 0  # the live heap really was sampled

    q = result["qlora"]
    if q["ran"]:  # bitsandbytes installed: the 4-bit base keeps the whole merged update
        assert q["quantized_layers"] > 0 and q["layers_checked"] > 0
        assert q["retention_min"] > 0.99 and q["relative_error_max"] < 1e-2
    else:
        assert "bitsandbytes" in q["reason"]

    table = done.stdout
    assert "FedSmoothLoRA / FedIT wall" in table and f"{fed['fedsmoothlora_vs_fedit_wall']:.3f}x" in table
