"""benchmarks/server_scaling.py --quick: every cell measured, the aggregate right, memory rows that make sense.

Runs the script's tiny-shape mode (a one-block Llama of hidden 256, its cells in this process, the memory
rows and ``systems.memory``'s smoke rows in fresh subprocesses; well under a minute) and checks what it
measured against what must hold whatever the machine's speed: no timing is compared with a number.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

from support.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "server_scaling.py"
# RSS of a fresh interpreter varies by a few MiB from run to run (allocator arenas, import order); the
# quick rows add well under 1 MiB of uploads from K=2 to 32, so "monotone" can only mean "within this".
RSS_NOISE_BYTES = 16 * 2**20


def _load():
    return load_script(SCRIPT, "benchmarks_server_scaling")


def test_quick_server_scaling(tmp_path):
    bench = _load()
    calibration_log = logging.getLogger("fedsmooth_hf.model.gradients")
    level = calibration_log.level
    out_json, out_png = tmp_path / "server_scaling.json", tmp_path / "server_scaling.png"
    returned = bench.main(["--quick", "--repeats", "2", "--out", str(out_json), "--plot", str(out_png)])
    saved = json.loads(out_json.read_text())
    assert calibration_log.level == level, "the in-process cells leave the caller's logging as it was"
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["summary"] == json.loads(json.dumps(returned["summary"]))
    s = saved["settings"]
    assert s["quick"] and s["threads"] == 1 and len(saved["machine"]["loadavg_at_start"]) == 3

    # every (strategy, r, K) cell, once, each with its own measurements
    cells = {(c["strategy"], c["rank"], c["clients"]): c for c in saved["cells"]}
    assert sorted(cells) == sorted(itertools.product(s["strategies"], s["ranks"], s["clients"]))
    assert len(saved["cells"]) == len(cells) and {"fedit", "fedsmoothlora"} <= set(s["strategies"])
    for (name, rank, k), c in cells.items():
        assert len(c["round_times"]) == 2 and c["inner_rank"] == k * rank
        assert c["aggregate_s"] > 0 and c["apply_s"] > 0 and c["record_s"] >= 0
        assert c["round_s"] >= c["aggregate_s"] and abs(c["projected_32_blocks_s"] - 32 * c["round_s"]) < 1e-12
        assert len(c["modules"]) == 7 and {m.rsplit(".", 1)[-1] for m in c["modules"]} == {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        dims = [tuple(int(x) for x in shape.split("x")) for shape in c["shapes"]]
        assert c["uploads_bytes"] == k * rank * sum(o + i for o, i in dims) * 4
        assert c["base_block_bytes"] == sum(o * i for o, i in dims) * 4
        assert c["aggregate_bound_s"] > 0 and c["aggregate_within"] == (c["aggregate_s"] <= c["aggregate_bound_s"])
        # the aggregate and the merge against dense float64 references
        checks = c["checks"]
        if name == "fedsmoothlora":  # best rank-r approximation (Eckart-Young), merged into W every round
            assert -1e-6 <= checks["aggregate_err"] <= 1e-4, checks
            assert checks["merge_err"] <= 1e-4, checks
        else:  # FedIT: the mean of the factors becomes the global adapter; the base is untouched
            assert checks["aggregate_err"] <= 1e-5 and checks["merge_err"] == 0.0, checks

    # the work bound grows with K r; the reference is this run's re-timing of aggregation.json's cell
    smooth = sorted((c for c in saved["cells"] if c["strategy"] == "fedsmoothlora"), key=lambda c: c["inner_rank"])
    assert all(a["aggregate_bound_s"] <= b["aggregate_bound_s"] for a, b in zip(smooth, smooth[1:]))
    summary = saved["summary"]
    assert summary["reference_now"]["s"] > 0 and summary["time_within"] == all(
        c["aggregate_within"] for c in saved["cells"])

    # memory rows: one fresh process per K; uploads exactly linear in K, peak RSS monotone within noise
    for name in s["memory_strategies"]:
        rows = sorted((r for r in saved["memory_rows"] if r["strategy"] == name), key=lambda r: r["clients"])
        assert [r["clients"] for r in rows] == sorted(s["memory_clients"])
        per_client = {r["uploads_bytes"] / r["clients"] for r in rows}
        assert len(per_client) == 1
        for a, b in zip(rows, rows[1:]):
            assert b["peak_rss_bytes"] >= a["peak_rss_bytes"] - RSS_NOISE_BYTES, (a, b)
            assert b["projected_7b_server_bytes"] > a["projected_7b_server_bytes"] - RSS_NOISE_BYTES
        assert all(r["peak_rss_bytes"] >= r["rss_model_bytes"] > 0 for r in rows)
        g = summary["memory_growth_7b"][name]
        assert g["clients"] == [rows[0]["clients"], rows[-1]["clients"]]
        assert g["block_peak_rss_within"] == (g["block_peak_rss"] <= 0.10)

    # the end-to-end rows are systems.memory's own (its smoke sizes here), compared with memory.json's figure
    e2e = saved["memory_e2e"]["rows"]
    assert [r["clients"] for r in e2e] == [2, 8]
    assert e2e[-1]["client_state_bytes"] == 4 * e2e[0]["client_state_bytes"]
    assert summary["memory_e2e_growth"] == saved["memory_e2e"]["peak_rss_growth"]
    assert abs(summary["memory_e2e_vs_recorded"] * saved["current"]["memory_growth"]
               - summary["memory_e2e_growth"]) < 1e-12
    assert summary["memory_e2e_within"] == (summary["memory_e2e_growth"] <= 0.10)
