"""``benchmarks/client_parallel.py`` at tiny size, and its ``--model smollm2`` path at one step.

The SmolLM2 measurement itself (4 clients x 10 steps, 3 rounds, three modes) takes minutes
(docs/benchmarks.md); here the tiny run goes through every mode end to end, the SmolLM2 plan
is checked argument by argument, and the worker trains SmolLM2 offline for one step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from support.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: `benchmarks` is not installed
from benchmarks.client_parallel import DEFAULTS, batch_of, plan  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
WORKER = ROOT / "tests" / "distributed_worker.py"


def _args(**kw) -> argparse.Namespace:
    base = {"model": "tiny", "clients": None, "local_steps": None, "rounds": None, "batch_size": None, "seq_len": 64}
    return argparse.Namespace(**{**base, **kw})


def test_tiny_benchmark_times_every_mode_and_client_parallel_matches_sequential(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "client_parallel.py"), "--clients", "2", "--rounds", "2",
           "--local_steps", "2", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "client_parallel.json").read_text())
    assert (tmp_path / "client_parallel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["model"] == "tiny" and result["clients"] == 2 and result["batch_size"] == 4
    runs = {r["mode"]: r for r in result["runs"]}
    assert list(runs) == ["sequential", "data-parallel", "client-parallel"]
    for r in runs.values():
        assert len(r["round_times_s"]) == 1, "round 1 is not timed"
        assert r["client_work_s"] > 0 and r["per_client_s"] == r["client_work_s"] / 2
        assert math.isclose(r["mean_round_s"] - r["outside_clients_s"],
                            r["client_work_s"] / (2 if r["mode"] == "client-parallel" else 1))
        assert r["wall_s"] > r["mean_round_s"] and math.isfinite(r["final_eval_loss"])
    assert runs["client-parallel"]["processes"] == 2 and runs["sequential"]["processes"] == 1
    assert result["same_result_as_sequential"] is True
    assert math.isclose(result["client_parallel_vs_sequential"],
                        runs["client-parallel"]["mean_round_s"] / runs["sequential"]["mean_round_s"])
    # data-parallel processes split the client's batch: every mode trains on the same global batch
    assert [r["batch_per_process"] for r in runs.values()] == [4, 2, 4]


def test_smollm2_plan_is_four_clients_of_ten_steps_at_batch_8_by_64_tokens():
    a = _args(model="smollm2")
    common, stem = plan(a)
    assert stem == "client_parallel_smollm2"
    flags = dict(zip(common[::2], common[1::2]))
    assert flags == {"--model": "smollm2", "--rounds": "3", "--clients": "4", "--local_steps": "10",
                     "--examples": str(4 * 8 * 10), "--strategy": "fedsmoothlora", "--seq_len": "64"}
    assert a.batch_size == 8 and batch_of("data-parallel", 8, 2) == 4 and batch_of("client-parallel", 8, 2) == 8
    a = _args(model="smollm2", local_steps=20, clients=6)
    flags = dict(zip(*[iter(plan(a)[0])] * 2))
    assert flags["--local_steps"] == "20" and flags["--clients"] == "6" and flags["--examples"] == str(6 * 8 * 20)
    common, stem = plan(_args())
    assert stem == "client_parallel" and "--seq_len" not in common  # the tiny figures keep their file
    assert dict(zip(common[::2], common[1::2]))["--examples"] == str(16 * DEFAULTS["tiny"]["clients"])


def test_worker_trains_smollm2_offline_on_padded_wordnet_rows(tmp_path):
    worker = load_script(WORKER, "distributed_worker")
    rows = worker.wordnet_rows("eval", 8, 64)
    assert len(rows) == 8 and {len(r) for r in rows["input_ids"]} == {64}
    for mask, labels in zip(rows["attention_mask"], rows["labels"]):
        n = sum(mask)
        assert mask == [1] * n + [0] * (64 - n) and labels[n:] == [-100] * (64 - n)
        assert any(t != -100 for t in labels[:n]), "the gloss is in the loss"

    out = tmp_path / "smollm2"
    cmd = [sys.executable, str(WORKER), "--model", "smollm2", "--out", str(out), "--clients", "1", "--rounds", "1",
           "--local_steps", "1", "--examples", "8", "--batch_size", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = json.loads((out / "rank0.json").read_text())
    before, after = record["round_history"][0]["eval_loss"], record["rounds"][0]["eval_loss"]
    assert math.isfinite(after) and after < before, "one FedSmoothLoRA round of SmolLM2 lowers the held-out loss"
    assert not (out / "run" / "round-1").exists(), "the benchmark size writes no checkpoint"
