"""Systems costs of federated LoRA, measured side by side in one run (used by ``run_all.py``).

(The Gradient-Aligned start's cost, sketched vs dense, has its own script: ``ga_cost.py``.)
* ``communication``: bytes each client uploads per round, per strategy, measured on the real
  uploads (the strategy's ``client_upload`` is wrapped) in the form that travels (its
  ``encode_upload``: FFA-LoRA sends only B), vs the analytic ``r (d_in + d_out) 4`` per module
  and vs the full model size; plus the analytic figures for SmolLM2-135M.
* ``memory``: peak RSS of a whole federated run vs the number of clients, each K in a fresh
  subprocess, so one K's allocations cannot hide another's.

    python benchmarks/systems.py communication|memory [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, ROOT, machine  # noqa: E402
from recipes.plots import pyplot  # noqa: E402

# isort: split

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from benchmarks.overhead import PeakRSS, build_data, lora_model, training_args  # noqa: E402
from fedsmooth_hf import FederatedArguments, FederatedTrainer, FedSmoothLoRAConfig  # noqa: E402
from fedsmooth_hf.strategies import available_strategies  # noqa: E402

TINY = "tiny-llama"  # benchmarks.overhead's 4-layer Llama (d=128) built from a config
VOCAB = 512
MEMORY_RANK = 4  # per-client state is K r (d_in + d_out) numbers: 128 clients x r=4 = 16 MiB on this model


def _federated(strategy: str, clients: int, rounds: int, local_steps: int, batch: int, rank: int,
               ga_samples: int, data, out: str, **extra) -> FederatedTrainer:
    fed = FederatedArguments(strategy=strategy, num_clients=clients, num_rounds=rounds, local_steps=local_steps,
                             lora_r=rank, lora_alpha=2 * rank, eval_rounds=0, **extra)
    method = FedSmoothLoRAConfig(ga_samples=ga_samples, ga_batch_size=batch)
    trainer = FederatedTrainer(model=lora_model(TINY, rank, method), args=training_args(out, batch), fed_args=fed,
                               train_dataset=data)
    trainer.remove_callback(PrinterCallback)  # disable_tqdm would print every local round's summary
    return trainer


def _plot_bars(labels, values, ylabel: str, title: str, path: Path, annotate=None) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(labels) + 1.5), 3.4))
    ax.bar(labels, values, color="#4c72b0")
    for i, v in enumerate(values):
        ax.text(i, v, annotate[i] if annotate else f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.25 * max(values))  # room for the labels above the bars
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------- communication
def _wire_bytes(strategy, client: int, upload) -> int:
    """Bytes of what travels: the strategy's wire form of the upload (FFA-LoRA: B only)."""
    return sum(t.numel() * t.element_size() for t in strategy.encode_upload(client, upload).values())


def analytic_upload_bytes(model, rank: int, bytes_per_number: int = 4) -> tuple[int, int]:
    """(sum over LoRA target modules of r (d_in + d_out) * bytes, number of modules)."""
    from fedsmooth_hf.model.adapter import find_target_modules

    modules = dict(model.named_modules())
    shapes = [modules[name].weight.shape for name in find_target_modules(model)]
    return sum(rank * (d_out + d_in) * bytes_per_number for d_out, d_in in shapes), len(shapes)


def smollm2_analytic(rank: int) -> dict | None:
    """Upload bytes vs model bytes for SmolLM2-135M, from its config on the meta device (no weights read)."""
    try:
        from transformers import AutoConfig, LlamaForCausalLM

        from recipes.offline_assets import smollm2_checkpoint

        config = AutoConfig.from_pretrained(smollm2_checkpoint())
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    except Exception as err:  # noqa: BLE001 - optional context figure
        print(f"[communication] SmolLM2-135M analytic figure skipped: {err!r}")
        return None
    upload, modules = analytic_upload_bytes(model, rank)
    full = sum(p.numel() for p in model.parameters()) * 4
    return {"model": "SmolLM2-135M", "rank": rank, "modules": modules, "upload_bytes": upload,
            "model_bytes_fp32": full, "ratio": upload / full}


def communication(out_dir: Path, smoke: bool = False) -> dict:
    """Bytes in each client's upload, per strategy, on the tiny Llama; every strategy in the same run."""
    clients, rank, batch = 2, 8, 8
    data = build_data(clients * 16, VOCAB, 48)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in available_strategies():
            trainer = _federated(name, clients, 1, 1, batch, rank, 8, data, tmp)
            sizes = []
            upload = trainer.strategy.client_upload

            def counting_upload(client, trained, _upload=upload, _sizes=sizes, _strategy=trainer.strategy):
                result = _upload(client, trained)
                _sizes.append(_wire_bytes(_strategy, client, result))
                return result

            trainer.strategy.client_upload = counting_upload
            trainer.train()
            linears = _target_linears(trainer)
            expected, modules = sum(rank * sum(m.weight.shape) * 4 for m in linears), len(linears)
            full = sum(p.numel() * 4 for n, p in trainer.model.named_parameters() if ".lora_" not in n)
            trains_a = name != "ffa_lora"  # FFA-LoRA freezes A: only B has to travel
            needed = expected if trains_a else sum(rank * m.weight.shape[0] * 4 for m in linears)
            rows[name] = {"upload_bytes": sizes[0], "uploads_measured": len(sizes),
                          "all_uploads_equal": len(set(sizes)) == 1, "expected_bytes": expected,
                          "modules": modules, "needed_bytes": needed, "model_bytes_fp32": full,
                          "ratio_to_model": sizes[0] / full}
            print(f"[communication] {name:<14} upload {sizes[0]:>9,d} B per client per round "
                  f"(r(d_in+d_out)4 x {modules} modules = {expected:,d}); full model {full:,d} B: "
                  f"{sizes[0] / full:.4f}", flush=True)
    result = {"benchmark": "communication", "machine": machine(),
              "settings": {"model": TINY, "rank": rank, "dtype": "float32"}, "rows": rows,
              "smollm2_135m": None if smoke else smollm2_analytic(rank)}
    _write(out_dir, "communication", result)
    names = list(rows)
    _plot_bars(names, [rows[n]["upload_bytes"] / 2**10 for n in names], "KiB per client per round",
               f"Upload per client per round ({TINY}, r={rank}, fp32); full model "
               f"{rows[names[0]]['model_bytes_fp32'] / 2**20:.1f} MiB", out_dir / "communication.png",
               [f"{100 * rows[n]['ratio_to_model']:.2f}%" for n in names])
    return result


def _target_linears(trainer):
    from fedsmooth_hf.model.adapter import lora_layers

    return [layer.base_layer for layer in lora_layers(trainer.model).values()]


# ---------------------------------------------------------------------- memory vs clients
def memory_child(clients: int, rounds: int, strategy: str) -> dict:
    """One federated run with K clients (all sampled every round); RSS of this fresh process.

    ``ru_maxrss`` alone is not enough: the imports peak above everything a small federated run
    allocates, which would hide any growth. So RSS is also sampled every 20 ms from just before the
    trainer is built to the end of training (``peak_rss_bytes``).
    """
    torch.set_num_threads(1)
    examples_per_client = 8
    data = build_data(clients * examples_per_client, VOCAB, 32)
    rss_start = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as mem:
        trainer = _federated(strategy, clients, rounds, 1, examples_per_client, MEMORY_RANK, examples_per_client,
                             data, tmp)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    return {"clients": clients, "rounds": rounds, "strategy": strategy, "wall_s": wall,
            "peak_rss_bytes": mem.peak, "rss_before_trainer_bytes": rss_start,
            "peak_rss_growth_in_run_bytes": mem.peak - rss_start,
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "client_state_bytes": trainer.strategy.client_state_bytes(),
            "model_bytes_fp32": sum(p.numel() * 4 for p in trainer.model.parameters())}


def memory(out_dir: Path, smoke: bool = False) -> dict:
    """Peak RSS vs K: each K runs in a fresh subprocess; flatness = peak(K_max) / peak(K_min) - 1."""
    counts = [2, 8] if smoke else [2, 8, 32, 128]
    rounds = 1 if smoke else 2
    rows = []
    for k in counts:
        cmd = [sys.executable, str(Path(__file__).resolve()), "memory-child", "--clients", str(k),
               "--rounds", str(rounds)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode:
            raise RuntimeError(f"memory child K={k} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"[memory] K={k:>3}: peak RSS {row['peak_rss_bytes'] / 2**20:.1f} MiB (+"
              f"{row['peak_rss_growth_in_run_bytes'] / 2**20:.1f} MiB during the run), client state "
              f"{row['client_state_bytes'] / 2**10:.0f} KiB, {row['wall_s']:.1f} s", flush=True)
    growth = rows[-1]["peak_rss_bytes"] / rows[0]["peak_rss_bytes"] - 1
    result = {"benchmark": "memory", "machine": machine(),
              "settings": {"model": TINY, "strategy": "fedsmoothlora", "rounds": rounds, "local_steps": 1,
                           "examples_per_client": 8, "clients_per_round": "all", "rank": MEMORY_RANK,
                           "measure": "RSS sampled every 20 ms from building the trainer to the end of training, "
                                      "one fresh subprocess per K (includes the ~0.5 GiB of torch+transformers)"},
              "rows": rows, "peak_rss_growth": growth, "flat_within_10pct": growth <= 0.10}
    _write(out_dir, "memory", result)
    _plot_bars([f"K={r['clients']}" for r in rows], [r["peak_rss_bytes"] / 2**20 for r in rows],
               "peak RSS (MiB)", f"Peak RSS of a whole FedSmoothLoRA run vs number of clients\n({TINY}, all clients "
               f"every round, {rounds} rounds; +{100 * growth:.1f}% from K={counts[0]} to K={counts[-1]})",
               out_dir / "memory.png",
               [f"{r['peak_rss_bytes'] / 2**20:.0f} MiB\nstate {r['client_state_bytes'] / 2**20:.2f} MiB"
                for r in rows])
    return result


def _write(out_dir: Path, name: str, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["communication", "memory", "memory-child"])
    p.add_argument("--smoke", action="store_true", help="the smallest sizes (CI)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--clients", type=int, default=2, help="memory-child only")
    p.add_argument("--rounds", type=int, default=1, help="memory-child only")
    p.add_argument("--strategy", default="fedsmoothlora", help="memory-child only")
    a = p.parse_args(argv)
    if a.what == "memory-child":
        print(json.dumps(memory_child(a.clients, a.rounds, a.strategy)))
        return
    {"communication": communication, "memory": memory}[a.what](Path(a.out_dir), a.smoke)


if __name__ == "__main__":
    main()
