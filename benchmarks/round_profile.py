"""Where a FedSmoothLoRA client round's extra time goes, against one plain forward+backward over ``ga_samples``.

Everything the strategy adds to a plain local round happens outside the ``Trainer`` inner loop
(``ClientResult.strategy_overhead_s``): loading the global adapter, the Round-Matching point as a
frozen offset, the calibration pass (forward+backward with the gradient hooks and their sketch
updates), the subspace reconstruction, the Gradient-Aligned factors and the Round-Matching SVD_r,
the share-kept metric, writing the start into the model, clearing the offsets, the upload's
SVD_r. This script times each of those phases inside a real round-1 client round of a
``FederatedTrainer`` (so Round-Matching is on), by wrapping the functions the round calls (each
wrapper is a ``torch.profiler.record_function`` range and an exclusive wall-clock timer), and
alternates each client round with a plain forward+backward of the same LoRA model over the same
calibration examples (ABAB, medians), so load from other jobs hits both alike. One more client
round runs under ``torch.profiler`` for the op-level table (top ops by self CPU time).

It also measures the frozen offset's per-step cost: the same training batch, fwd+bwd with and
without the client's offsets, alternating, medians.

    python benchmarks/round_profile.py            # SmolLM2-135M, 16 calibration samples, r=8
    python benchmarks/round_profile.py --smoke    # the tiny Llama, seconds (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, machine  # noqa: E402
from recipes.plots import pyplot, save  # noqa: E402

# isort: split

import torch  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from benchmarks.ga_cost import batches_of, calibration_data  # noqa: E402
from benchmarks.overhead import lora_model, training_args  # noqa: E402
from fedsmooth_hf import FederatedArguments, FederatedTrainer, FedSmoothLoRAConfig  # noqa: E402

#: phase label -> (module path, attribute) wrapped for the measurement; nested calls are timed exclusively
PHASES = {
    "load global adapter": ("fedsmooth_hf.trainer.trainer:FederatedTrainer", "load_global_adapter"),
    "Round-Matching terms": ("fedsmooth_hf.strategies.fedsmoothlora.strategy:FedSmoothLoRA", "round_matching"),
    "set/clear offsets": ("fedsmooth_hf.engine.local_round", "set_offsets"),
    "clear offsets": ("fedsmooth_hf.engine.local_round", "clear_offsets"),
    "calibration pass (fwd+bwd)": ("fedsmooth_hf.engine.local_round", "estimate_gradient_subspaces"),
    "sketch updates (in the pass)": ("fedsmooth_hf.math.sketch:SketchedGradient", "add"),
    "dense gradient updates (in the pass)": ("fedsmooth_hf.math.sketch:DenseGradient", "add"),
    "subspace reconstruction": ("fedsmooth_hf.math.sketch:SketchedGradient", "top_singular"),
    "dense SVD": ("fedsmooth_hf.math.sketch:DenseGradient", "top_singular"),
    "GA factors + SVD_r(B_ga A_ga + W_rm)": ("fedsmooth_hf.strategies.fedsmoothlora.strategy", "client_init_factors"),
    "rm_kept metric": ("fedsmooth_hf.strategies.fedsmoothlora.strategy", "_share_kept"),
    "client start (rest)": ("fedsmooth_hf.strategies.fedsmoothlora.strategy:FedSmoothLoRA", "client_start"),
    "write start into model": ("fedsmooth_hf.engine.local_round", "apply_client_start"),
    "upload SVD_r": ("fedsmooth_hf.strategies.fedsmoothlora.strategy:FedSmoothLoRA", "client_upload"),
}
# "set/clear offsets" and "clear offsets" are one phase in the report
MERGED = {"clear offsets": "set/clear offsets"}


class PhaseTimer:
    """Exclusive wall-clock and CPU seconds per phase (a nested phase's time is not counted in its caller's)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._stack: list[list[float]] = []  # [wall start, cpu start, child wall, child cpu]
        self._undo = []

    def wrap(self, label: str, owner, attr: str) -> None:
        original = getattr(owner, attr)
        timer = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with torch.profiler.record_function(f"fedsmooth::{label}"):
                timer._stack.append([time.perf_counter(), time.process_time(), 0.0, 0.0])
                try:
                    return original(*args, **kwargs)
                finally:
                    start, cpu_start, child, child_cpu = timer._stack.pop()
                    spent, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                    name = MERGED.get(label, label)
                    timer.seconds[name] = timer.seconds.get(name, 0.0) + spent - child
                    timer.cpu_seconds[name] = timer.cpu_seconds.get(name, 0.0) + cpu - child_cpu
                    if timer._stack:
                        timer._stack[-1][2] += spent
                        timer._stack[-1][3] += cpu

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original))

    def install(self) -> None:
        import importlib

        for label, (path, attr) in PHASES.items():
            module, _, cls = path.partition(":")
            owner = importlib.import_module(module)
            self.wrap(label, getattr(owner, cls) if cls else owner, attr)

    def reset(self) -> None:
        self.seconds, self.cpu_seconds = {}, {}

    def uninstall(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo = []


def plain_fwd_bwd(model, batches) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward+backward of the LoRA model over ``batches``, as training does."""
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        model(**b).loss.backward()
    sec, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.zero_grad(set_to_none=True)
    return sec, cpu


OFFSET_VARIANTS = ("without", "separate hook", "fused")


def offset_step_cost(trainer, batch, repeats: int) -> dict:
    """fwd+bwd on one training batch without the client's frozen offsets, with them as a separate hook
    (before) and fused with the adapter (now), alternating; medians of wall and CPU seconds."""
    from fedsmooth_hf.model.adapter import clear_offsets, set_offsets

    strategy = trainer.strategy
    grads = {n: _random_gradient(layer, i) for i, (n, layer) in enumerate(trainer.layers.items())}
    start = strategy.client_start(0, grads)
    strategy._offsets.pop(0, None)  # no upload follows
    offsets = start.offsets
    from fedsmooth_hf.model.adapter import set_lora_factors

    set_lora_factors(trainer.layers, start.lora)  # the adapter a client trains from
    times = {v: [] for v in OFFSET_VARIANTS}
    cpu = {v: [] for v in OFFSET_VARIANTS}
    plain_fwd_bwd(trainer.model, [batch])  # warm-up
    for _ in range(repeats):
        for which in OFFSET_VARIANTS:
            if which != "without":
                set_offsets(trainer.layers, offsets, fuse=which == "fused")
            sec, c = plain_fwd_bwd(trainer.model, [batch])
            times[which].append(sec)
            cpu[which].append(c)
            clear_offsets(trainer.layers)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"seconds": times, "cpu_seconds": cpu, "median_s": med, "median_cpu_s": med_cpu,
            "overhead": med["fused"] / med["without"] - 1,
            "overhead_separate_hook": med["separate hook"] / med["without"] - 1,
            "cpu_overhead": med_cpu["fused"] / med_cpu["without"] - 1,
            "cpu_overhead_separate_hook": med_cpu["separate hook"] / med_cpu["without"] - 1}


def _random_gradient(layer, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(layer.out_features, layer.in_features, generator=gen)


def build_trainer(kind: str, rank: int, ga_samples: int, batch: int, seq_len: int, local_steps: int, tmp: str):
    ds, collator = calibration_data(kind, 2 * max(ga_samples, batch * local_steps), seq_len)
    fed = FederatedArguments(strategy="fedsmoothlora", num_clients=2, num_rounds=1, local_steps=local_steps,
                             lora_r=rank, lora_alpha=2 * rank, eval_rounds=0)
    method = FedSmoothLoRAConfig(ga_samples=ga_samples, ga_batch_size=batch)
    trainer = FederatedTrainer(model=lora_model(kind, rank, method), args=training_args(tmp, batch), fed_args=fed,
                               train_dataset=ds, data_collator=collator)
    trainer.remove_callback(PrinterCallback)
    return trainer, ds, collator


def calibration_sample(trainer, client: int, seed: int) -> list:
    """The very batches a client round calibrates on (same seed, same selection)."""
    from fedsmooth_hf.engine.local_round import calibration_batches

    return list(calibration_batches(trainer, client, seed))


def profile_table(trainer, round_idx: int, client: int, top: int) -> dict:
    """One client round under ``torch.profiler``: phase ranges and the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        trainer.train_client_round(round_idx, client)
    events = prof.key_averages()
    phases = {e.key.split("::", 1)[1]: e.cpu_time_total / 1e6 for e in events if e.key.startswith("fedsmooth::")}
    ops = sorted((e for e in events if not e.key.startswith("fedsmooth::")), key=lambda e: -e.self_cpu_time_total)
    rows = [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ops[:top]]
    return {"phase_cpu_time_total_s": phases, "top_ops_by_self_cpu": rows}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    phases = result["phases_median_s"]
    ref = result["plain_fwd_bwd_median_s"]
    names = [n for n, v in sorted(phases.items(), key=lambda kv: -kv[1]) if v > 0]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    left = 0.0
    colors = pyplot().get_cmap("tab20").colors
    for i, n in enumerate(names):
        ax.barh(1, phases[n] / ref, left=left, color=colors[i % len(colors)], label=f"{n}: {phases[n] / ref:.3f}x")
        left += phases[n] / ref
    ax.barh(0, 1.0, color="#4c72b0")
    ax.set_yticks([0, 1], labels=["plain fwd+bwd\nover ga_samples", "FedSmoothLoRA\nclient-round extra"])
    ax.axvline(1.5, color="k", ls="--", lw=0.8)
    ax.set_xlabel("seconds / one plain forward+backward over the calibration samples")
    s = result["settings"]
    ax.set_title(f"{s['model']}, r={s['rank']}, ga_samples={s['ga_samples']}: extra "
                 f"{result['extra_vs_fwd_bwd']:.2f}x (target <= 1.5x, dashed)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save(fig, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the tiny Llama from a config (CI)")
    p.add_argument("--repeats", type=int, default=None, help="client rounds, each alternated with a plain pass")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--ga_samples", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-profiler", action="store_true", help="skip the torch.profiler round")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    kind = "tiny-llama" if a.smoke else "smollm2"
    repeats = a.repeats or (2 if a.smoke else 3)
    local_steps = 1
    load_start = machine()["loadavg"]
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _, _ = build_trainer(kind, a.rank, a.ga_samples, a.batch, a.seq_len, local_steps, tmp)
        trainer.train()  # round 0: afterwards every client has an upload, so round 1 has Round-Matching
        trainer.strategy.begin_round(1)
        timer = PhaseTimer()
        timer.install()
        from fedsmooth_hf.engine.local_round import client_round_seed

        runs, cpu_runs, plain, plain_cpu, totals = [], [], [], [], []
        try:
            for i in range(repeats):
                client = i % 2
                batches = calibration_sample(trainer, client, client_round_seed(trainer.args.seed, 1, client))
                sec, cpu = plain_fwd_bwd(trainer.model, batches)
                plain.append(sec)
                plain_cpu.append(cpu)
                timer.reset()
                result = trainer.train_client_round(1, client)
                runs.append(dict(timer.seconds))
                cpu_runs.append(dict(timer.cpu_seconds))
                totals.append(result.strategy_overhead_s)
            profiled = None if a.no_profiler else profile_table(trainer, 1, 0, 25)
        finally:
            timer.uninstall()
        train_batch = batches_of(*calibration_data(kind, a.batch, a.seq_len), a.batch, a.batch)[0]
        offset = offset_step_cost(trainer, train_batch, 2 if a.smoke else 5)
    names = sorted({n for r in runs for n in r})
    phases = {n: statistics.median(r.get(n, 0.0) for r in runs) for n in names}
    total = statistics.median(totals)
    ref = statistics.median(plain)
    phases["unattributed"] = max(0.0, total - sum(phases.values()))
    cpu_phases = {n: statistics.median(r.get(n, 0.0) for r in cpu_runs) for n in names}
    ref_cpu = statistics.median(plain_cpu)
    result = {
        "benchmark": "round_profile", "machine": machine(), "loadavg_start": load_start,
        "settings": {"model": kind, "rank": a.rank, "ga_samples": a.ga_samples, "batch": a.batch,
                     "seq_len": a.seq_len, "round": 1, "repeats": repeats, "threads": a.threads,
                     "measure": "strategy_overhead_s of a round-1 client round (Round-Matching on) vs one plain "
                                "fwd+bwd over the same calibration batches, alternating, medians"},
        "plain_fwd_bwd_s": plain, "strategy_overhead_s": totals, "phases_s": runs,
        "plain_fwd_bwd_median_s": ref, "strategy_overhead_median_s": total, "phases_median_s": phases,
        "extra_vs_fwd_bwd": total / ref,
        "plain_fwd_bwd_cpu_s": plain_cpu, "phases_cpu_s": cpu_runs, "phases_cpu_median_s": cpu_phases,
        "extra_vs_fwd_bwd_cpu": sum(cpu_phases.values()) / ref_cpu,
        "phases_vs_fwd_bwd": {n: v / ref for n, v in phases.items()},
        "profiler": profiled, "offset_step": offset, "seconds": time.perf_counter() - t_all,
    }
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "round_profile_smoke" if a.smoke else "round_profile"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / f"{name}.png")
    print(f"\n[round_profile] {kind}: client-round extra / plain fwd+bwd over {a.ga_samples} samples = "
          f"{result['extra_vs_fwd_bwd']:.3f}x ({total:.2f} s vs {ref:.2f} s; target <= 1.5)")
    for n, v in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {n:<40}{v:>9.3f} s {v / ref:>8.3f}x")
    print(f"  in CPU time (sum of the phases): {result['extra_vs_fwd_bwd_cpu']:.3f}x")
    print(f"  frozen offset per fwd+bwd step, fused: {100 * offset['overhead']:+.1f}% wall, "
          f"{100 * offset['cpu_overhead']:+.1f}% CPU; separate hook: {100 * offset['overhead_separate_hook']:+.1f}% "
          f"wall, {100 * offset['cpu_overhead_separate_hook']:+.1f}% CPU (target <= +3%)")
    print(f"[round_profile] wrote {out / name}.json and .png ({result['seconds']:.0f} s; load at start {load_start})")
    return result


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
