"""Crash safety: a run SIGKILLed anywhere resumes from its last complete checkpoint, bit-identically.

One subprocess (tests/scripts/crash_child.py) imports once and forks: the uninterrupted
reference run, then per kill point a run that SIGKILLs itself there and a fresh
process that resumes it with ``resume_from_checkpoint=True``. Tolerance: none;
every tensor of every resumed checkpoint must equal the reference bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scripts.crash_child import KILL_POINTS, KILL_ROUND

from fedsmooth_hf.persistence.checkpoint import MODEL_FILE, STATE_FILE, STRATEGY_FILE

NUM_ROUNDS = 3
TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def crash_runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("crash")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    proc = subprocess.run([sys.executable, str(TESTS / "scripts" / "crash_child.py"), str(workdir), *KILL_POINTS],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, json.loads((workdir / "report.json").read_text())


def _checkpoint(run_dir: Path, round_number: int):
    path = run_dir / f"round-{round_number}"
    tensors = {name: load_file(path / name) for name in (MODEL_FILE, STRATEGY_FILE)}
    history = json.loads((path / STATE_FILE).read_text())["round_history"]
    return tensors, history


def test_reference_run_completes(crash_runs):
    workdir, report = crash_runs
    assert report["reference"] == {"signal": None, "exit": 0}
    entries = sorted(p.name for p in (workdir / "reference").iterdir())
    assert entries == ["partition.png", "round-1", "round-2", "round-3"]  # the picture of the split, then checkpoints


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_run_resumes_to_identical_weights(crash_runs, point):
    workdir, report = crash_runs
    killed, resumed = report[point]["killed"], report[point]["resumed"]
    # the process really died by SIGKILL, at the named point
    assert killed["signal"] == signal.SIGKILL, killed
    assert (workdir / f"{point}.reached").read_text() == point
    # what survives the kill: the last complete checkpoint, never a partial round-<k>
    last_complete = KILL_ROUND if point == "between_rounds" else KILL_ROUND - 1
    assert killed["latest_after_kill"] == f"round-{last_complete}"
    published = [e for e in killed["entries_after_kill"] if not e.startswith(".") and e != "partition.png"]
    assert published == [f"round-{k}" for k in range(1, last_complete + 1)]
    if point.startswith("checkpoint_"):
        # the kill landed mid-write: a temporary directory is all that exists of round 2
        assert any(e.startswith(f".round-{KILL_ROUND}.tmp-") for e in killed["entries_after_kill"])
    # a fresh process resumed after the last complete round, ran only the rest, left no temporaries
    assert resumed["exit"] == 0 and resumed["signal"] is None, resumed
    assert resumed["rounds_run"] == list(range(last_complete + 1, NUM_ROUNDS + 1))
    assert resumed["entries_after_resume"] == ["partition.png"] + [f"round-{k}" for k in range(1, NUM_ROUNDS + 1)]
    # every checkpoint the resumed process wrote equals the uninterrupted run's, bit for bit
    max_abs_diff = 0.0
    for k in range(last_complete + 1, NUM_ROUNDS + 1):
        got, got_history = _checkpoint(workdir / point, k)
        want, want_history = _checkpoint(workdir / "reference", k)
        for name in want:
            assert got[name].keys() == want[name].keys()
            for key, tensor in want[name].items():
                max_abs_diff = max(max_abs_diff, float((got[name][key] - tensor).abs().max()))
                assert torch.equal(got[name][key], tensor), f"{point}: round-{k} {name} '{key}' differs"
        for g, w in zip(got_history, want_history, strict=True):
            assert (g["round"], g.get("train_loss"), g.get("eval_loss")) == (
                w["round"], w.get("train_loss"), w.get("eval_loss"))
    assert max_abs_diff == 0.0
