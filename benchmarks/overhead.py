"""What does federating cost? FederatedTrainer (K clients x R rounds x S steps) vs one plain Trainer run.

Both runs train the same LoRA model on the same data for the same number of optimizer
steps (K * R * S), with the same TrainingArguments, in this one process, alternating
repeats (plain, FedIT, FedSmoothLoRA, plain, ...; medians), so load from other jobs hits each
alike. Printed: wall-clock time of each and their ratios (FedIT and FedSmoothLoRA vs plain,
FedSmoothLoRA vs FedIT), the same ratios in process CPU time (with one thread, much less
sensitive to other jobs on the machine than wall time), the part spent in the strategy
(``strategy_overhead_s``: FedSmoothLoRA's gradient pass, subspace reconstruction, client start and
upload truncation), and the peak RSS of each run.

    python benchmarks/overhead.py                 # SmolLM2-135M: 2 clients x 2 rounds x 10 steps
    python benchmarks/overhead.py --local_steps 20 --out ..._20.json
    python benchmarks/overhead.py --quick         # a small Llama from a config
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ROOT, machine  # noqa: E402
from recipes.plots import pyplot  # noqa: E402

# isort: split

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from fedsmooth_hf import FederatedArguments, FederatedLoraConfig, FederatedTrainer, FedSmoothLoRAConfig  # noqa: E402


class PeakRSS:
    """Samples this process's RSS every 20 ms while active; `.peak` is the maximum seen."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def build_model(kind: str):
    if kind == "smollm2":
        from recipes.offline_assets import smollm2_checkpoint

        return LlamaForCausalLM.from_pretrained(smollm2_checkpoint())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def build_data(n: int, vocab: int, seq_len: int):
    import datasets

    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, vocab, (n,), generator=gen).tolist()
    ids = [[(s + i) % vocab for i in range(seq_len)] for s in starts]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def lora_model(kind: str, r: int, method: FedSmoothLoRAConfig | None = None):
    """The model with a rank-`r` LoRA adapter on every Linear but the head; its LoRA config carries `method`.

    Args:
        kind (`str`): `"tiny-llama"` or `"smollm2"`.
        r (`int`): LoRA rank (alpha is `2 r`).
        method (`FedSmoothLoRAConfig`, *optional*): FedSmoothLoRA's options, read by a `FederatedTrainer`
            from the adapter's config.
    """
    from peft import get_peft_model

    from fedsmooth_hf.model.adapter import find_target_modules

    model = build_model(kind)
    config = FederatedLoraConfig(r=r, lora_alpha=2 * r, target_modules=find_target_modules(model),
                                 fedsmoothlora_config=method)
    return get_peft_model(model, config)


def training_args(out: str, batch: int) -> TrainingArguments:
    return TrainingArguments(output_dir=out, per_device_train_batch_size=batch, learning_rate=1e-3,
                             lr_scheduler_type="constant", logging_steps=10**6, report_to="none", use_cpu=True,
                             disable_tqdm=True, save_strategy="no", seed=0, dataloader_num_workers=0)


def run_plain(kind, data, steps, batch, r, tmp):
    model = lora_model(kind, r)
    args = training_args(tmp, batch)
    args.max_steps = steps
    trainer = Trainer(model=model, args=args, train_dataset=data)
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": mem.peak}


def run_federated(kind, data, strategy, clients, rounds, local_steps, batch, r, ga_samples, tmp):
    model = lora_model(kind, r, FedSmoothLoRAConfig(ga_samples=ga_samples, ga_batch_size=batch))
    fed = FederatedArguments(strategy=strategy, num_clients=clients, num_rounds=rounds, local_steps=local_steps,
                             lora_r=r, lora_alpha=2 * r, eval_rounds=0)
    trainer = FederatedTrainer(model=model, args=training_args(tmp, batch), fed_args=fed, train_dataset=data)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # as the plain run prints nothing per step
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    over = sum(r.get("strategy_overhead_s", 0.0) for r in trainer.round_history)
    local = sum(r.get("local_train_time_s", 0.0) for r in trainer.round_history)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": mem.peak, "strategy_overhead_s": over,
            "local_train_time_s": local, "client_state_bytes": trainer.strategy.client_state_bytes()}


def median_run(runs: list[dict]) -> dict:
    """Field-wise medians of repeated runs of one variant (``runs`` keeps every repeat)."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"runs": runs}


def plot(results: dict, path: Path) -> None:
    plt = pyplot()

    labels = ["plain Trainer", "FedIT", "FedSmoothLoRA"]
    walls = [results["plain"]["wall_s"], results["fedit"]["wall_s"], results["fedsmoothlora"]["wall_s"]]
    ga = [0.0, results["fedit"]["strategy_overhead_s"], results["fedsmoothlora"]["strategy_overhead_s"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(labels, [w - g for w, g in zip(walls, ga)], label="training + round overhead", color="#4c72b0")
    ax.bar(labels, ga, bottom=[w - g for w, g in zip(walls, ga)], label="strategy overhead (GA start, upload)",
           color="#dd8452")
    for i, w in enumerate(walls):
        ax.text(i, w, f"{w / walls[0]:.2f}x", ha="center", va="bottom")
    steps = results["settings"]["total_steps"]
    ax.set_ylabel("wall clock (s)")
    ax.set_title(f"{steps} optimizer steps, {results['settings']['model']} (ratio vs plain)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small Llama from a config instead of SmolLM2-135M")
    p.add_argument("--clients", type=int, default=None, help="default: 2 (SmolLM2), 4 (--quick)")
    p.add_argument("--rounds", type=int, default=None, help="default: 2 (SmolLM2), 3 (--quick)")
    p.add_argument("--local_steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=None, help="default: 64 (SmolLM2), 48 (--quick)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--ga_samples", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="alternating repeats of the three runs (medians)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/overhead.json"))
    p.add_argument("--plot", default=str(ROOT / "benchmarks/results/overhead.png"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    kind = "tiny-llama" if a.quick else "smollm2"
    clients = a.clients or (4 if a.quick else 2)
    rounds = a.rounds or (3 if a.quick else 2)
    seq_len = a.seq_len or (48 if a.quick else 64)
    local_steps = a.local_steps
    total = clients * rounds * local_steps
    vocab = 512 if a.quick else 49152
    data = build_data(clients * max(a.ga_samples, a.batch * local_steps), vocab, seq_len)
    tmp = str(ROOT / "benchmarks/results/tmp")
    results = {"settings": {"model": kind, "clients": clients, "rounds": rounds, "local_steps": local_steps,
                            "total_steps": total, "batch": a.batch, "seq_len": seq_len, "rank": a.rank,
                            "ga_samples": a.ga_samples, "repeats": a.repeats},
               "machine": machine()}
    print(f"[overhead] {kind}: {clients} clients x {rounds} rounds x {local_steps} steps = {total} steps "
          f"vs a plain Trainer run of {total} steps; {a.repeats} alternating repeat(s)")
    runs = {"plain": [], "fedit": [], "fedsmoothlora": []}
    for _ in range(a.repeats):
        runs["plain"].append(run_plain(kind, data, total, a.batch, a.rank, tmp))
        for strategy in ("fedit", "fedsmoothlora"):
            runs[strategy].append(run_federated(kind, data, strategy, clients, rounds, local_steps, a.batch, a.rank,
                                                a.ga_samples, tmp))
    for name, rs in runs.items():
        results[name] = median_run(rs)
    base = results["plain"]["wall_s"]
    results["ratio_fedit"] = results["fedit"]["wall_s"] / base
    results["ratio_fedsmoothlora"] = results["fedsmoothlora"]["wall_s"] / base
    results["ratio_fedsmoothlora_vs_fedit"] = results["fedsmoothlora"]["wall_s"] / results["fedit"]["wall_s"]
    cpu = {k: results[k]["cpu_s"] for k in runs}
    results["cpu_ratio_fedit"] = cpu["fedit"] / cpu["plain"]
    results["cpu_ratio_fedsmoothlora"] = cpu["fedsmoothlora"] / cpu["plain"]
    results["cpu_ratio_fedsmoothlora_vs_fedit"] = cpu["fedsmoothlora"] / cpu["fedit"]
    results["strategy_overhead_share_of_local_training"] = (results["fedsmoothlora"]["strategy_overhead_s"]
                                                            / results["fedsmoothlora"]["local_train_time_s"])
    mb = 1 / 2**20
    print(f"{'run':<16}{'wall (s)':>10}{'ratio':>8}{'CPU (s)':>10}{'ratio':>8}{'peak RSS (MiB)':>16}")
    for name in runs:
        r = results[name]
        print(f"{name:<16}{r['wall_s']:>10.2f}{r['wall_s'] / base:>8.3f}{r['cpu_s']:>10.2f}"
              f"{r['cpu_s'] / cpu['plain']:>8.3f}{r['peak_rss_bytes'] * mb:>16.0f}")
    print(f"FedSmoothLoRA / FedIT: wall {results['ratio_fedsmoothlora_vs_fedit']:.3f}, CPU "
          f"{results['cpu_ratio_fedsmoothlora_vs_fedit']:.3f}")
    print("FedSmoothLoRA strategy overhead (GA start, upload): "
          f"{results['fedsmoothlora']['strategy_overhead_s']:.2f} s = "
          f"{results['strategy_overhead_share_of_local_training']:.3f} x its local training time")
    results["machine"]["loadavg_end"] = machine()["loadavg"]
    results["machine"]["note"] = ("one process, runs alternating plain, FedIT, FedSmoothLoRA per repeat; medians; "
                                  "load average at start and end recorded (other jobs shared the machine)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    plot(results, Path(a.plot))
    print(f"wrote {a.out} and {a.plot}")
    return results


if __name__ == "__main__":
    main()
