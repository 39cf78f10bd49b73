"""The evidence sweeps: the per-process driver resumes and survives a failed run, the report's arithmetic,
reused baselines, and each script's real run at a size of seconds."""

from __future__ import annotations

import json
import statistics
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: `benchmarks` is not installed
from benchmarks.evidence_suite.report import markdown, reach, report, summarize  # noqa: E402
from benchmarks.evidence_suite.sweep import Sweep, run_sweep  # noqa: E402

# A stand-in run script: the record's loss curve is 3 - round * step; "crash" fails unless a marker file exists.
FAKE_SCRIPT = """
import json, sys
from pathlib import Path
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
name, seed = args["--one"], int(args["--seed"])
if name == "crash" and not (Path(__file__).parent / "fixed").exists():
    sys.exit("boom")
step = {"fedit": 0.1, "better": 0.3, "crash": 0.2}[name]
losses = [3 - r * step - 0.01 * seed for r in range(4)]
Path(args["--record"]).write_text(json.dumps({
    "strategy": name, "seed": seed, "eval_loss": losses, "final_eval_loss": losses[-1],
    "train_wall_s": [0, 10, 20, 30], "wall_s": 40.0, "loadavg_end": [0, 0, 0]}))
"""


def fake_sweep(tmp_path: Path, **overrides) -> Sweep:
    script = tmp_path / "fake_run.py"
    script.write_text(textwrap.dedent(FAKE_SCRIPT))
    spec = dict(name="fake", script=str(script), setting={"local_steps": 20},
                configs={"fedit": {}, "better": {}, "crash": {}}, tiers=[["fedit", "better"], ["crash"]],
                seeds=2, out_dir=tmp_path)
    return Sweep(**{**spec, **overrides})


def test_driver_runs_each_config_in_its_own_process_and_resumes_after_a_failure(tmp_path, capsys):
    sweep = fake_sweep(tmp_path)
    assert sweep.planned() == [("fedit", 0), ("better", 0), ("fedit", 1), ("better", 1), ("crash", 0), ("crash", 1)]
    runs = run_sweep(sweep, resume=False)
    assert sorted((r["strategy"], r["seed"]) for r in runs) == [("better", 0), ("better", 1), ("fedit", 0),
                                                                ("fedit", 1)]
    assert "crash seed 0 FAILED" in capsys.readouterr().out
    assert len(json.loads(sweep.path.read_text())["runs"]) == 4  # written as they land
    (tmp_path / "fixed").write_text("")
    runs = run_sweep(sweep, resume=True)  # only the failed runs run again
    assert len(runs) == 6 and "4 runs kept, 2 to run" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="another setting"):
        run_sweep(fake_sweep(tmp_path, setting={"local_steps": 50}), resume=True)


def test_report_counts_rounds_and_seconds_to_the_references_final(tmp_path):
    sweep = fake_sweep(tmp_path)
    run_sweep(sweep, resume=False)
    rows = {r["strategy"]: r for r in report(sweep, "fake")}
    target = statistics.mean([2.7, 2.69])  # fedit's final losses over seeds 0 and 1
    assert rows["fedit"]["reference_final"] == pytest.approx(target)
    # "better" falls by 0.3 a round: seed 0 is at 2.7 > 2.695 after round 1, 2.4 after round 2; seed 1 at 2.69
    assert rows["better"]["rounds_to_reference"] == 1.5 and rows["better"]["train_s_to_reference"] == 15
    assert rows["fedit"]["reached"] == 1  # seed 0 ends at 2.7 > 2.695: only seed 1 reaches the mean
    table = sweep.path.with_suffix(".md").read_text()
    assert "| better | 2 | 2.095 ± 0.007 |" in table
    assert sweep.path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_reach_reads_accuracy_upward_and_ignores_round_zero():
    run = {"eval_accuracy": [0.9, 0.5, 0.8], "train_wall_s": [0, 5, 9]}
    assert reach(run, "eval_accuracy", 0.7) == (2, 9)
    assert reach({"eval_loss": [1.0, 2.0], "train_wall_s": [0, 5]}, "eval_loss", 1.5) == (None, None)


def test_reused_baselines_need_the_same_setting(tmp_path):
    source = fake_sweep(tmp_path, name="source")
    run_sweep(source, resume=False)
    borrower = fake_sweep(tmp_path, name="borrower", configs={"fedit": {}, "better": {}},
                          tiers=[["fedit", "better"]], reuses={"fedit": ("source", "fedit")})
    assert borrower.planned() == [("better", 0), ("better", 1)]
    assert sorted(r["seed"] for r in borrower.reused()) == [0, 1]
    rows = summarize(borrower, borrower.reused())
    assert rows[0]["reused_from"] == ["source"]
    other = fake_sweep(tmp_path, name="other", setting={"local_steps": 3}, reuses={"fedit": ("source", "fedit")})
    assert other.reused() == []  # measured at another setting: not a baseline of this sweep


@pytest.mark.parametrize("script", ["evidence_nlg", "evidence_cls"])
def test_each_scripts_run_at_a_size_of_seconds(script):
    import importlib

    module = importlib.import_module(f"benchmarks.{script}")
    small = {"num_rounds": 1, "local_steps": 1, "max_eval_samples": 8, "num_clients": 2}
    small.update({"max_train_samples": 200} if script == "evidence_cls" else {"clients_per_round": 2})
    record = module.run_one("fedsmoothlora", 0, {**module.SETTING, **small})
    assert record["strategy"] == "fedsmoothlora" and len(record["eval_loss"]) == 2
    assert record["final_eval_loss"] == record["eval_loss"][-1] and record["wall_s"] > record["train_wall_s"][-1] > 0
    if script == "evidence_nlg":
        assert 0 <= record["rouge_l"] <= 1 and len(record["examples"]) == 3
    else:
        assert 0 <= record["final_eval_accuracy"] <= 1


def test_seconds_per_run_are_medians_so_one_slowed_run_does_not_move_them(tmp_path):
    sweep = fake_sweep(tmp_path, seeds=3)
    runs = [{"strategy": "fedit", "seed": s, "eval_loss": [3.0, 2.0], "final_eval_loss": 2.0,
             "train_wall_s": [0, 10], "wall_s": wall, "cpu_s": cpu}
            for s, (wall, cpu) in enumerate([(40.0, 70.0), (5000.0, 3000.0), (42.0, 72.0)])]
    row = summarize(sweep, runs)[0]
    assert row["wall_s"] == 42.0 and row["cpu_s"] == 72.0
    assert "| 42 | 72 |" in markdown(sweep, [row])
    without_cpu = summarize(sweep, [{k: v for k, v in r.items() if k != "cpu_s"} for r in runs])
    assert without_cpu[0]["cpu_s"] is None and "CPU s" not in markdown(sweep, without_cpu)
