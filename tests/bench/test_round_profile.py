"""``benchmarks/round_profile.py --smoke``: the client-round breakdown and the offset's step cost, at tiny size."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_round_profile_smoke_breaks_down_the_strategy_overhead(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "round_profile.py"), "--smoke", "--out-dir",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "round_profile_smoke.json").read_text())
    assert (tmp_path / "round_profile_smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    phases = r["phases_median_s"]
    # the wrapped functions really ran inside the round-1 client round (Round-Matching on)
    for name in ("calibration pass (fwd+bwd)", "sketch updates (in the pass)", "subspace reconstruction",
                 "GA factors + SVD_r(B_ga A_ga + W_rm)", "rm_kept metric", "Round-Matching terms", "upload SVD_r"):
        assert phases[name] > 0, name
    # exclusive times: the phases never add up to more than the trainer's own overhead timer
    for run, total in zip(r["phases_s"], r["strategy_overhead_s"]):
        assert sum(run.values()) <= total * 1.001 + 1e-3
    assert math.isclose(r["extra_vs_fwd_bwd"], r["strategy_overhead_median_s"] / r["plain_fwd_bwd_median_s"])
    assert any(k.startswith("calibration pass") for k in r["profiler"]["phase_cpu_time_total_s"])
    assert r["profiler"]["top_ops_by_self_cpu"][0]["self_cpu_s"] > 0
    step = r["offset_step"]
    assert set(step["median_s"]) == {"without", "separate hook", "fused"}
    assert all(math.isfinite(step[k]) for k in ("overhead", "overhead_separate_hook", "cpu_overhead"))
