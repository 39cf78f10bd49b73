"""CI smoke of the benchmark scripts: ``run_all.py --smoke``, ``convergence.py --task tiny`` and ``--task lm-cls``.

The real sweeps take an hour (docs/benchmarks.md); these run the same code paths at sizes of
seconds and check that the figures they report are the ones the code claims to measure.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# benchmarks.overhead's tiny Llama: hidden 128, MLP 256, 4 layers, 4 heads of 32, 2 KV heads.
TINY_LAYERS, HIDDEN, MLP, KV = 4, 128, 256, 2 * 32
TINY_RANK = 8


def _expected_upload_bytes() -> int:
    """r (d_in + d_out) float32 numbers per adapted Linear: q, k, v, o, gate, up, down of every layer."""
    shapes = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (MLP, HIDDEN), (MLP, HIDDEN),
              (HIDDEN, MLP)]
    return TINY_LAYERS * sum(TINY_RANK * (d_out + d_in) * 4 for d_out, d_in in shapes)


def test_run_all_smoke_writes_sane_summary(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke", "--out-dir",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((tmp_path / "summary.json").read_text())
    markdown = (tmp_path / "summary.md").read_text()
    assert summary["mode"] == "smoke" and "| benchmark | measured | value |" in markdown
    for part in ("aggregation_smoke", "overhead_smoke", "ga_cost", "communication", "memory"):
        assert (tmp_path / f"{part}.json").is_file(), part
        assert (tmp_path / f"{part}.png").read_bytes()[:8] == PNG_MAGIC, part

    for row in summary["aggregation"]:  # Eckart-Young: factored error equals the best rank-r error
        assert row["optimal"] and abs(row["error_ratio"] - 1) < 1e-4, row
        assert row["speedup"] > 0
    assert summary["overhead"]["ratio_fedit"] > 0 and summary["overhead"]["ratio_fedsmoothlora"] > 0

    ga = summary["ga_cost"]
    assert all(math.isfinite(v) for v in ga.values()), ga
    assert ga["ga_start_sketch_vs_fwd_bwd"] > 0 and ga["client_round_sketch_vs_fedit"] > 0
    assert 0 < ga["memory_fraction_accounted"] < 1  # the sketches hold less than the dense gradients
    assert 0 < ga["functional_min"] <= ga["functional_mean"]
    _check_ga_cost(json.loads((tmp_path / "ga_cost.json").read_text()))

    expected = _expected_upload_bytes()
    assert len(summary["communication"]) == 6
    for name, row in summary["communication"].items():
        assert row["expected_bytes"] == expected, name
        assert row["upload_bytes"] == row["needed_bytes"], name  # what travels is what the server needs
        assert 0 < row["ratio_to_model"] < 1
        if name != "ffa_lora":
            assert row["upload_bytes"] == expected, name
    assert summary["communication"]["ffa_lora"]["upload_bytes"] < expected  # A is frozen: B alone travels

    memory = {int(k): v for k, v in summary["memory"].items()}
    small, large = min(memory), max(memory)
    # FedSmoothLoRA keeps each client's last upload: state grows exactly linearly in K ...
    assert memory[large]["client_state_bytes"] == large // small * memory[small]["client_state_bytes"]
    # ... while the process as a whole stays flat (no per-client model copies).
    assert summary["memory_growth"] <= 0.10 and summary["memory_flat_within_10pct"]


def _check_ga_cost(result: dict) -> None:
    """ga_cost.json reports what its code measured: byte counts from the sketch sizes, ratios from seconds."""
    from fedsmooth_hf.math.sketch import sketch_sizes

    model, rounds = result["model"], result["client_rounds"]
    best = model["seconds_best"]
    assert model["ratio_sketch_vs_fwd_bwd"] == best["sketch"] / best["plain_fwd_bwd"]
    assert rounds["ratio_fedsmoothlora_sketch_vs_fedit"] == (rounds["fedsmoothlora_sketch"]["client_round_s"]
                                                             / rounds["fedit"]["client_round_s"])
    assert rounds["fedit"]["strategy_overhead_s"] < rounds["fedsmoothlora_dense"]["strategy_overhead_s"]
    assert model["memory"]["dense_state_bytes"] == model["memory"]["dense_fp32_gradients_bytes"]
    assert model["memory"]["sketch_state_bytes"] < model["memory"]["dense_state_bytes"]
    q = 2 * result["settings"]["rank"]
    for row in result["shapes"]:
        d_out, d_in = map(int, row["shape"].split("x"))
        k, l = sketch_sizes(q, d_out, d_in)
        assert (row["sketch"]["k"], row["sketch"]["l"]) == (k, l)
        assert row["sketch"]["state_bytes"] == 4 * (d_out * k + l * d_in)
        assert row["dense"]["state_bytes"] == 4 * d_out * d_in
        assert row["dense"]["accuracy"]["functional"] > 0.999  # the dense path is the exact SVD here
        assert 0.5 < row["sketch"]["accuracy"]["functional"] < 1.5
    assert sum(r["default"] for r in model["sketch_size_sweep"]) == 1
    assert len(model["accuracy_per_layer"]) == model["layers"]


def test_convergence_tiny_two_strategies(tmp_path):
    from benchmarks import convergence

    result = convergence.main(["--task", "tiny", "--strategies", "fedit,fedsmoothlora", "--out-dir", str(tmp_path)])

    saved = json.loads((tmp_path / "convergence_tiny.json").read_text())
    assert (tmp_path / "convergence_tiny.png").read_bytes()[:8] == PNG_MAGIC
    assert [r["name"] for r in saved["runs"]] == ["fedit", "fedsmoothlora"]
    for run in saved["runs"]:
        assert [p["round"] for p in run["rounds"]] == [0, 1, 2]
        assert all(0 <= p["eval_accuracy"] <= 1 and p["eval_loss"] > 0 for p in run["rounds"])
        # logging_steps=1: one loss per local step, for every client in every round (4 clients x 2 rounds)
        assert len(run["client_traces"]) == 8 and all(len(t["losses"]) == 3 for t in run["client_traces"])
        # training wall time per round: 0 before round 1, then growing, and below the run's wall time
        seconds = [p["train_wall_s"] for p in run["rounds"]]
        assert seconds[0] == 0 and 0 < seconds[1] < seconds[2] < run["wall_s"]
    rows = result["summary"]["dirichlet0.5"]["rows"]
    assert set(rows) == {"fedit", "fedsmoothlora"}
    assert result["summary"]["dirichlet0.5"]["reference"] == "fedit"
    for row in rows.values():
        assert math.isfinite(row["client_loss_jump_mean"]["mean"])
        assert 0 <= row["final"]["mean"] <= 1


def test_convergence_lm_classification_on_the_pretrained_backbone(tmp_path):
    """The lm-cls task end to end at seconds' size: SmolLM2-135M, a new 10-way head, Dirichlet clients."""
    from benchmarks import convergence
    from recipes.offline_assets import load_wordnet_instructions

    convergence.main(["--task", "lm-cls", "--strategies", "fedit,fedsmoothlora", "--partitions", "dirichlet0.1",
                      "--seeds", "1", "--rounds", "2", "--set", "num_clients=3", "--set", "local_steps=1",
                      "--set", "max_eval_samples=16", "--set", "ga_samples=4", "--set", "ga_batch_size=4",
                      "--set", "per_device_train_batch_size=4", "--set", "max_length=16",
                      "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "convergence_lm-cls.json").read_text())
    assert [r["name"] for r in saved["runs"]] == ["fedit", "fedsmoothlora"]
    assert saved["runs"][0]["task_info"]["data"] == "WordNet word + gloss -> 10 lexicographer categories"
    assert saved["runs"][0]["task_info"]["train"] == sum(  # exactly the glosses of the ten categories
        c in convergence.LM_CLS_CATEGORIES for c in load_wordnet_instructions("train")["category"])
    for run in saved["runs"]:
        assert [p["round"] for p in run["rounds"]] == [0, 1, 2]
        assert all(0 <= p["eval_accuracy"] <= 1 and p["eval_loss"] > 0 for p in run["rounds"])
    smooth = saved["runs"][1]["rounds"]
    assert smooth[1]["zeta"] == 1.0 and smooth[2]["zeta"] < 1.0  # zeta_mode=auto on a Dirichlet split: cosine
    assert 0 < smooth[2]["rm_kept_median"] <= 1


def test_client_loss_jump_and_rounds_to_reach():
    from benchmarks.convergence import client_loss_jumps, rounds_to_reach, seconds_to_reach

    traces = [{"round": 2, "client": 0, "losses": [1.5, 1.0]},
              {"round": 1, "client": 0, "losses": [2.0, 1.2]},
              {"round": 1, "client": 1, "losses": [2.0, 0.9]},
              {"round": 3, "client": 1, "losses": [1.1, 0.8]}]
    # client 0: 1.5 - 1.2 (round 2 vs 1); client 1 skipped round 2: 1.1 - 0.9 (round 3 vs 1)
    assert [round(j, 6) for j in client_loss_jumps(traces)] == [0.3, 0.2]
    series = [{"round": 0, "eval_accuracy": 0.1, "eval_loss": 2.0},
              {"round": 1, "eval_accuracy": 0.5, "eval_loss": 1.0},
              {"round": 2, "eval_accuracy": 0.7, "eval_loss": 0.8}]
    assert rounds_to_reach(series, "eval_accuracy", 0.6) == 2
    timed = [{**r, "train_wall_s": 10.0 * r["round"]} for r in series]
    assert seconds_to_reach(timed, 2) == 20.0 and seconds_to_reach(timed, None) is None
    assert rounds_to_reach(series, "eval_loss", 1.0) == 1
    assert rounds_to_reach(series, "eval_accuracy", 0.9) is None


def _documented_convergence_commands() -> list[list[str]]:
    """Every ``python benchmarks/convergence.py ...`` command line of docs/benchmarks.md and README.md, as argv."""
    import re
    import shlex

    text = " ".join((ROOT / name).read_text() for name in ("docs/benchmarks.md", "README.md"))
    text = re.sub(r"\s+", " ", text)  # a command may wrap over two lines inside a bullet
    commands = re.findall(r"python benchmarks/convergence\.py ((?:--[\w-]+(?: [^\s`#-][^\s`#]*)? ?)+)", text)
    return [shlex.split(c) for c in commands]


def test_every_documented_convergence_command_parses_and_its_runs_are_recipe_command_lines(tmp_path):
    """The documented sweeps keep working: each command parses, and every run of each task (every partition,
    strategy and ablation variant) is a valid command line of the recipe the task builds through."""
    from benchmarks.convergence_suite.runner import build_parser, sweep_plan
    from benchmarks.convergence_suite.settings import TASKS
    from benchmarks.convergence_suite.tasks import make_task

    commands = _documented_convergence_commands()
    tasks = {argv[argv.index("--task") + 1] for argv in commands}
    assert tasks >= {"vit", "nlg", "vit-ablation", "lm-cls", "nlg8", "vit-participation", "lm-cls-ablation",
                     "nlg8-ablation"}, commands
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv)
    for name, spec in TASKS.items():
        options, seeds, partitions, configs = sweep_plan(parser.parse_args(["--task", name]), spec)
        task = make_task(name)
        for part in partitions.values():
            for config in configs.values():
                args, fed, method, recipe_args = task.parse({**options, **part, **config}, 0, str(tmp_path))
                assert fed.strategy == config["strategy"]
                for key, value in config.items():  # an ablation's option lands in the method's config
                    if key != "strategy":
                        assert str(getattr(method, key)).lower() == str(value).lower(), (name, key)
