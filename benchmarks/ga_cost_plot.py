"""The GA cost benchmark's figure: GA start vs a plain pass, client rounds, memory and accuracy (ga_cost.png)."""

from __future__ import annotations

from pathlib import Path

from recipes.plots import pyplot, save

MIB = 2**20


def plot(result: dict, path: Path) -> Path:
    """Draws the four panels of `ga_cost.json`'s `result` into `path`."""
    plt = pyplot()

    m, c, shapes = result["model"], result["client_rounds"], result["shapes"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    blue, orange, grey = "#4c72b0", "#dd8452", "#8c8c8c"

    ax = axes[0]
    best = m["seconds_best"]
    labels = ["plain fwd+bwd", "GA start\nsketch", "GA start\ndense"]
    vals = [best["plain_fwd_bwd"], best["sketch"], best["dense"]]
    grad = [best["plain_fwd_bwd"], m["ga_start_parts_best"]["sketch"]["gradient_pass_s"],
            m["ga_start_parts_best"]["dense"]["gradient_pass_s"]]
    ax.bar(labels, grad, color=[grey, blue, orange], label="gradient pass")
    ax.bar(labels, [v - g for v, g in zip(vals, grad)], bottom=grad, color=[grey, blue, orange], alpha=0.45,
           hatch="//", label="subspace / SVDs + client start")
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v / vals[0]:.2f}x", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("seconds")
    ax.set_title(f"GA start, {m['model']}, {m['layers']} layers\n(ga_samples={m['ga_samples']}; ratio vs fwd+bwd)",
                 fontsize=9)
    ax.set_ylim(0, 1.45 * max(vals))
    ax.legend(fontsize=7, loc="upper left")

    ax = axes[1]
    labels = ["FedIT", "FedSmooth\nsketch", "FedSmooth\ndense"]
    keys = ["fedit", "fedsmoothlora_sketch", "fedsmoothlora_dense"]
    local = [c[k]["local_train_s"] for k in keys]
    over = [c[k]["strategy_overhead_s"] for k in keys]
    ax.bar(labels, local, color=grey, label="local training")
    ax.bar(labels, over, bottom=local, color=[grey, blue, orange], label="strategy overhead")
    for i, (lo, ov) in enumerate(zip(local, over)):
        ax.text(i, lo + ov, f"{(lo + ov) / (local[0] + over[0]):.2f}x", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, 1.45 * max(lo + ov for lo, ov in zip(local, over)))
    ax.set_ylabel("seconds per client round")
    s = result["settings"]
    ax.set_title(f"client round ({s['local_steps']} steps x batch {s['batch']}, ga_samples={s['ga_samples']})",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")

    ax = axes[2]
    names = [m["model"]] + [r["shape"] for r in shapes]
    dense = [m["memory"]["dense_fp32_gradients_bytes"] / MIB] + [r["dense"]["state_bytes"] / MIB for r in shapes]
    sk = [(m["memory"]["sketch_state_bytes"] + m["memory"]["sketch_test_matrix_bytes"]) / MIB] + \
        [r["sketch"]["state_bytes"] / MIB for r in shapes]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], dense, 0.4, color=orange, label="dense G")
    ax.bar([i + 0.2 for i in x], sk, 0.4, color=blue, label="sketches")
    for i, (d, v) in enumerate(zip(dense, sk)):
        ax.text(i + 0.2, v, f"{100 * v / d:.1f}%", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(list(x), [n.replace("x", "x\n", 1) if "x" in n else n for n in names], fontsize=7)
    ax.set_ylabel("MiB held by the estimate (log)")
    ax.set_title("memory of the GA estimate\n(model: all adapted layers; shapes: one layer)", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[3]
    func = sorted(r["functional"] for r in m["accuracy_per_layer"])
    ax.plot([100 * i / max(1, len(func) - 1) for i in range(len(func))], func, color=blue, label=f"{m['model']} layers")
    for r in shapes:
        ax.axhline(r["sketch"]["accuracy"]["functional"], ls=":", color=grey)
    ax.axhline(0.95, color="red", lw=0.8, label="0.95")
    ax.set_ylim(min(0.7, min(func) - 0.02), 1.02)
    ax.set_xlabel("layers, sorted (%)")
    ax.set_ylabel("gradient energy vs exact factors")
    ax.set_title(f"accuracy of the sketched GA factors\n(mean {m['accuracy']['functional']['mean']:.3f}; "
                 "dotted: 7B shapes)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return save(fig, path, dpi=100)
