"""What the Gradient-Aligned start costs, sketched vs dense, measured side by side in one run.

On SmolLM2-135M (real weights, real WordNet text; offline) it times, alternating repeats:

* one plain forward+backward of the LoRA model over the ``ga_samples`` calibration examples,
* the whole GA start with ``ga_estimator="sketch"`` and ``"dense"``: gradient pass, subspace
  reconstruction or SVDs, and the strategy's client start for every adapted layer;

then FedSmoothLoRA (sketch, dense) vs FedIT client rounds (``ga_samples=16``, 10 local steps,
batch 8; ``strategy_overhead_s`` and the local training time from the trainer's round record),
the per-step cost of the frozen offset, the memory of the estimates (their own byte accounting
and the measured peak-RSS rise over a plain forward+backward), and the accuracy of the sketched
GA factors vs the exact SVD of the dense gradient on the same pass: relative Frobenius error of
``B_ga A_ga`` (signs aligned), largest principal angles of ``span U[:, :2r]`` and
``span V[:, :2r]``, and the functional measure, the gradient energy a first LoRA step moves
along, ``||U_{r:2r} U_{r:2r}^T G||^2 + ||G V_{:r} V_{:r}^T||^2`` relative to the exact factors'.

At LLaMA-7B shapes (4096x4096, 11008x4096, 4096x11008) the gradients are synthetic: sums of
``g^T x`` over 1024 tokens with a 1/i singular spectrum (like SmolLM2's; docs/benchmarks.md).

    python benchmarks/ga_cost.py            # SmolLM2-135M + 7B shapes (docs/benchmarks.md: what it takes)
    python benchmarks/ga_cost.py --smoke    # tiny Llama + small shapes, seconds (CI)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, ROOT, machine  # noqa: E402

# isort: split

import subprocess  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402

from benchmarks.ga_accuracy import SEVEN_B_SHAPES, exact_top, ga_metrics, shapes_part, summarize_metrics  # noqa: E402
from benchmarks.ga_cost_plot import plot  # noqa: E402
from benchmarks.overhead import PeakRSS, build_data, lora_model, training_args  # noqa: E402
from fedsmooth_hf import FederatedArguments, FederatedTrainer, FedSmoothLoRAConfig  # noqa: E402
from fedsmooth_hf.math.sketch import SketchedGradient, TestMatrices, sketch_sizes  # noqa: E402
from fedsmooth_hf.model.adapter import clear_offsets, get_lora_factors, lora_layers, set_offsets  # noqa: E402
from fedsmooth_hf.model.gradients import estimate_gradient_subspaces  # noqa: E402
from fedsmooth_hf.strategies import get_strategy  # noqa: E402


# ---------------------------------------------------------------------- data
def calibration_data(kind: str, n: int, seq_len: int):
    """(dataset, collator): real WordNet text for SmolLM2, the synthetic sequences for the tiny Llama."""
    if kind == "tiny-llama":
        return build_data(n, 512, seq_len), None
    from transformers import AutoTokenizer

    from recipes.nlg_llama import ModelDataArguments, PadCollator, tokenize_dataset
    from recipes.offline_assets import load_wordnet_instructions, smollm2_checkpoint

    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    rows = load_wordnet_instructions("train").shuffle(seed=0).select(range(2 * n))
    ds = tokenize_dataset(rows, tok, ModelDataArguments(max_length=seq_len)).select(range(n))
    return ds, PadCollator(tok.pad_token_id if tok.pad_token_id is not None else 0)


def batches_of(ds, collator, n: int, batch: int):
    rows = [ds[i] for i in range(n)]
    if collator is None:
        return [{k: torch.tensor([r[k] for r in rows[j: j + batch]]) for k in ("input_ids", "labels")}
                for j in range(0, n, batch)]
    return [collator(rows[j: j + batch]) for j in range(0, n, batch)]


# ---------------------------------------------------------------------- SmolLM2 / tiny Llama part
def _plain_fwd_bwd(model, batches):
    model.train()
    for b in batches:
        model(**b).loss.backward()
    model.zero_grad(set_to_none=True)


def _ga_start(model, layers, batches, strategy):
    """Everything the GA start adds: gradient pass + strategy.client_start (reconstruction / SVDs, factors)."""
    t0 = time.perf_counter()
    est = estimate_gradient_subspaces(model, layers, batches, **strategy.gradient_request())
    t1 = time.perf_counter()
    strategy.client_start(0, est)
    t2 = time.perf_counter()
    strategy._offsets.clear()  # no upload follows: drop the client's pending offsets
    return est, {"gradient_pass_s": t1 - t0, "client_start_s": t2 - t1, "total_s": t2 - t0}


class PeakHeap:
    """Peak of the bytes malloc has handed out and not taken back (glibc ``mallinfo2``: ``uordblks +
    hblkhd``), sampled every 5 ms. Unlike RSS it does not count freed memory the heap keeps."""

    def __init__(self):
        import ctypes
        import threading

        class _Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                        "fsmblks", "uordblks", "fordblks", "keepcost")]

        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = _Info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start = self.peak = self.live()

    def live(self) -> int:
        info = self._libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.live())
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.live())


def _measured(fn):
    """(result, seconds, peak RSS rise in bytes over the RSS at the start)."""
    gc.collect()
    proc = psutil.Process()
    start = proc.memory_info().rss
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        sec = time.perf_counter() - t0
    return out, sec, max(0, mem.peak - start)


def model_part(kind: str, rank: int, ga_samples: int, batch: int, seq_len: int, repeats: int) -> dict:
    model = lora_model(kind, rank)
    layers = lora_layers(model)
    ds, collator = calibration_data(kind, max(ga_samples, batch), seq_len)
    batches = batches_of(ds, collator, ga_samples, batch)
    strategies = {}
    for name in ("sketch", "dense"):
        s = get_strategy("fedsmoothlora", rank=rank, ga_estimator=name)
        s.setup(get_lora_factors(layers))
        strategies[name] = s
    _plain_fwd_bwd(model, batches[:1])  # warm-up
    times = {"plain_fwd_bwd": [], "sketch": [], "dense": []}
    parts = {"sketch": [], "dense": []}
    estimates = {}
    # Alternating repeats, so drifting load hits every variant alike (peak RSS: see rss_rise, one
    # fresh process per variant, since freed heap memory is reused by whichever pass comes next).
    for _ in range(repeats):
        for name in ("plain_fwd_bwd", "sketch", "dense"):
            if name == "plain_fwd_bwd":
                _, sec, peak = _measured(partial(_plain_fwd_bwd, model, batches))
            else:
                estimates.pop(name, None)
                (est, part), sec, peak = _measured(partial(_ga_start, model, layers, batches, strategies[name]))
                parts[name].append(part)
                estimates[name] = est
            times[name].append(sec)
    best = {k: min(v) for k, v in times.items()}
    sk, de = estimates["sketch"], estimates["dense"]

    # accuracy of the streamed sketches vs the exact SVD of the dense gradient of the same pass
    q = 2 * rank
    t0 = time.perf_counter()
    exact = {n: exact_top(de[n].grad, q) for n in de}
    exact_svd_s = time.perf_counter() - t0
    rows = []
    for n in layers:
        U, _, V = sk[n].top_singular(q)
        rows.append({"layer": n, "kind": sk[n].kind, **ga_metrics(de[n].grad, U, V, *exact[n], rank)})
    # sketch sizes around the default, from the same dense gradients (Y = G Omega, Z = Psi G exactly)
    sweep = []
    for over, co in [(0, 16), (8, 16), (16, 16), (16, 32), (32, 48)]:
        k, l = q + over, q + over + co
        tests, mets, mem = TestMatrices(0), [], 0
        for n in layers:
            G = de[n].grad
            d_out, d_in = G.shape
            if k >= min(d_out, d_in) or l >= d_out:
                continue
            s = SketchedGradient(d_out, d_in, k, l, tests)
            s.Y, s.Z = G @ s.omega, s.psi @ G
            U, _, V = s.top_singular(q)
            mets.append(ga_metrics(G, U, V, *exact[n], rank))
            mem += s.nbytes
        sweep.append({"k": k, "l": l, "default": (k, l) == sketch_sizes(q, 10**6, 10**6),
                      "memory_fraction": mem / de.dense_bytes, **summarize_metrics(mets)})

    # per-step cost of the frozen offset: a training step with and without rank-r offsets on every layer
    gen = torch.Generator().manual_seed(0)
    offsets = {n: (torch.randn(l_.out_features, rank, generator=gen) * 1e-3,
                   torch.randn(rank, l_.in_features, generator=gen))
               for n, l_ in layers.items()}
    step = {"without": [], "with": []}
    for _ in range(max(3, repeats * 2)):
        for which in ("without", "with"):
            if which == "with":
                set_offsets(layers, offsets)
            t0 = time.perf_counter()
            _plain_fwd_bwd(model, batches)
            step[which].append(time.perf_counter() - t0)
            clear_offsets(layers)
    memory = {"sketch_state_bytes": sk.state_bytes, "sketch_test_matrix_bytes": sk.test_matrix_bytes,
              "dense_state_bytes": de.state_bytes, "dense_fp32_gradients_bytes": de.dense_bytes,
              "sketched_layers": sum(e.kind == "sketch" for e in sk.values()),
              "fraction_accounted": (sk.state_bytes + sk.test_matrix_bytes) / de.dense_bytes}
    del model, estimates, exact, de, sk
    gc.collect()
    return {
        "model": kind, "layers": len(layers), "rank": rank, "ga_samples": ga_samples, "batch": batch,
        "seq_len": seq_len,
        "repeats": repeats, "seconds_best": best, "seconds_all": times,
        "ga_start_parts_best": {k: min(v, key=lambda p: p["total_s"]) for k, v in parts.items()},
        "ratio_sketch_vs_fwd_bwd": best["sketch"] / best["plain_fwd_bwd"],
        "ratio_dense_vs_fwd_bwd": best["dense"] / best["plain_fwd_bwd"],
        "exact_svd_of_all_layers_s": exact_svd_s,
        "memory": memory,
        "accuracy": summarize_metrics(rows), "accuracy_per_layer": rows, "sketch_size_sweep": sweep,
        "offset_step_s": {k: min(v) for k, v in step.items()},
        "offset_step_overhead": min(step["with"]) / min(step["without"]) - 1,
    }


def rss_child(kind: str, which: str, rank: int, ga_samples: int, batch: int, seq_len: int) -> dict:
    """In a fresh process: peak RSS rise of one plain fwd+bwd, or one whole GA start ('sketch'/'dense')."""
    model = lora_model(kind, rank)
    layers = lora_layers(model)
    ds, collator = calibration_data(kind, max(ga_samples, batch), seq_len)
    batches = batches_of(ds, collator, ga_samples, batch)
    if which == "plain_fwd_bwd":
        run = lambda: _plain_fwd_bwd(model, batches)  # noqa: E731
    else:
        strategy = get_strategy("fedsmoothlora", rank=rank, ga_estimator=which)
        strategy.setup(get_lora_factors(layers))
        run = lambda: _ga_start(model, layers, batches, strategy)  # noqa: E731
    gc.collect()
    with PeakHeap() as heap:
        _, sec, peak = _measured(run)
    return {"which": which, "peak_rss_rise_bytes": peak, "peak_heap_rise_bytes": heap.peak - heap.start,
            "seconds": sec}


def rss_rise(kind: str, rank: int, ga_samples: int, batch: int, seq_len: int, threads: int) -> dict:
    """Peak RSS and live-heap rise of each pass, each in its own fresh process (same imports, model, batches)."""
    out, heap = {}, {}
    for which in ("plain_fwd_bwd", "sketch", "dense"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", which, "--threads", str(threads)]
        if kind == "tiny-llama":
            cmd.append("--smoke")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        child = json.loads(done.stdout.strip().splitlines()[-1])
        out[which], heap[which] = child["peak_rss_rise_bytes"], child["peak_heap_rise_bytes"]
    return out, heap


# ---------------------------------------------------------------------- client rounds
def client_rounds(kind: str, rank: int, ga_samples: int, local_steps: int, batch: int, seq_len: int,
                  clients: int, rounds: int) -> dict:
    """FedSmoothLoRA (sketch, dense) vs FedIT: seconds per client round, from one trainer each."""
    ds, collator = calibration_data(kind, clients * max(ga_samples, batch * local_steps), seq_len)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, strategy, estimator in [("fedit", "fedit", "sketch"), ("fedsmoothlora_sketch", "fedsmoothlora",
                                                                           "sketch"),
                                           ("fedsmoothlora_dense", "fedsmoothlora", "dense")]:
            fed = FederatedArguments(strategy=strategy, num_clients=clients, num_rounds=rounds, local_steps=local_steps,
                                     lora_r=rank, lora_alpha=2 * rank, eval_rounds=0)
            method = FedSmoothLoRAConfig(ga_samples=ga_samples, ga_batch_size=batch, ga_estimator=estimator)
            args = training_args(tmp, batch)
            trainer = FederatedTrainer(model=lora_model(kind, rank, method), args=args, fed_args=fed, train_dataset=ds,
                                       data_collator=collator)
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
            t0 = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t0
            h = trainer.round_history
            n = clients * rounds
            over = sum(r["strategy_overhead_s"] for r in h) / n
            local = sum(r["local_train_time_s"] for r in h) / n
            out[label] = {"client_round_s": over + local, "strategy_overhead_s": over, "local_train_s": local,
                          "wall_s": wall, "client_rounds": n}
            del trainer
            gc.collect()
    for label in ("fedsmoothlora_sketch", "fedsmoothlora_dense"):
        out[f"ratio_{label}_vs_fedit"] = out[label]["client_round_s"] / out["fedit"]["client_round_s"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny Llama and small shapes: seconds (CI)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--rounds", type=int, default=1, help="federated rounds per client-round timing")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                   help="torch threads; 1 by default: on a loaded machine, 2 threads made LAPACK calls far slower")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--rss-child", choices=["plain_fwd_bwd", "sketch", "dense"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out_dir = Path(a.out_dir)
    kind = "tiny-llama" if a.smoke else "smollm2"
    rank, ga_samples, batch, seq_len, local_steps, clients = 8, 16, 8, 64, 10, 2
    if a.smoke:
        local_steps, seq_len = 3, 32
    if a.rss_child:
        print(json.dumps(rss_child(kind, a.rss_child, rank, ga_samples, batch, seq_len)))
        return {}
    repeats = a.repeats or (1 if a.smoke else 2)
    shapes = [(384, 256), (256, 640)] if a.smoke else SEVEN_B_SHAPES
    load_start = os.getloadavg()
    t_all = time.perf_counter()
    print(f"[ga_cost] {kind}: GA start sketch vs dense vs plain fwd+bwd ({repeats} alternating repeats)", flush=True)
    model = model_part(kind, rank, ga_samples, batch, seq_len, repeats)
    print("[ga_cost] peak RSS of each pass, one fresh process each", flush=True)
    rss, heap = rss_rise(kind, rank, ga_samples, batch, seq_len, a.threads)
    extra = {k: max(0, rss[k] - rss["plain_fwd_bwd"]) for k in ("sketch", "dense")}
    extra_heap = {k: max(0, heap[k] - heap["plain_fwd_bwd"]) for k in ("sketch", "dense")}
    dense_bytes = model["memory"]["dense_fp32_gradients_bytes"]
    model["memory"].update(peak_rss_rise_bytes=rss, extra_rss_over_fwd_bwd_bytes=extra,
                           fraction_rss=extra["sketch"] / dense_bytes, peak_heap_rise_bytes=heap,
                           extra_heap_over_fwd_bwd_bytes=extra_heap, fraction_heap=extra_heap["sketch"] / dense_bytes)
    print(f"[ga_cost] client rounds: FedIT vs FedSmoothLoRA ({clients} clients x {a.rounds} round(s))", flush=True)
    rounds = client_rounds(kind, rank, ga_samples, local_steps, batch, seq_len, clients, a.rounds)
    print("[ga_cost] synthetic gradients at " + ", ".join(f"{o}x{i}" for o, i in shapes), flush=True)
    shape_rows = shapes_part(shapes, rank, tokens=1024 if not a.smoke else 256,
                             batch_tokens=512 if not a.smoke else 128,
                             latent=256 if not a.smoke else 96)
    result = {
        "benchmark": "ga_cost",
        "machine": {**machine(), "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg(),
                    "note": "2-core machine shared with a long background benchmark sweep: seconds are under load; "
                            "compare the side-by-side ratios (alternating repeats), not absolute times"},
        "settings": {"model": kind, "rank": rank, "ga_samples": ga_samples, "batch": batch, "ga_batch_size": batch,
                     "seq_len": seq_len, "local_steps": local_steps, "clients": clients, "rounds": a.rounds,
                     "repeats": repeats, "smoke": a.smoke},
        "model": model, "client_rounds": rounds, "shapes": shape_rows,
        "seconds": time.perf_counter() - t_all,
    }
    result["headline"] = {
        "ga_start_sketch_vs_fwd_bwd": model["ratio_sketch_vs_fwd_bwd"],
        "ga_start_dense_vs_fwd_bwd": model["ratio_dense_vs_fwd_bwd"],
        "client_round_sketch_vs_fedit": rounds["ratio_fedsmoothlora_sketch_vs_fedit"],
        "client_round_dense_vs_fedit": rounds["ratio_fedsmoothlora_dense_vs_fedit"],
        "memory_fraction_accounted": model["memory"]["fraction_accounted"],
        "memory_fraction_rss": model["memory"]["fraction_rss"],
        "functional_mean": model["accuracy"]["functional"]["mean"],
        "functional_min": model["accuracy"]["functional"]["min"],
        "offset_step_overhead": model["offset_step_overhead"],
        "local_training_fedsmoothlora_vs_fedit": rounds["fedsmoothlora_sketch"]["local_train_s"]
        / rounds["fedit"]["local_train_s"],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ga_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out_dir / "ga_cost.png")
    h = result["headline"]
    mm = model["memory"]
    print(f"\n{'':<34}{'sketch':>10}{'dense':>10}   target")
    print(f"{'GA start / plain fwd+bwd':<34}{h['ga_start_sketch_vs_fwd_bwd']:>10.2f}"
          f"{h['ga_start_dense_vs_fwd_bwd']:>10.2f}"
          "   <= 2.0")
    print(f"{'client round / FedIT':<34}{h['client_round_sketch_vs_fedit']:>10.2f}"
          f"{h['client_round_dense_vs_fedit']:>10.2f}"
          "   <= 1.3")
    print(f"{'estimate memory / dense G (own)':<34}{mm['fraction_accounted']:>10.3f}"
          f"{mm['dense_state_bytes'] / mm['dense_fp32_gradients_bytes']:>10.3f}   <= 0.10")
    print(f"{'extra peak RSS / dense G':<34}{mm['fraction_rss']:>10.3f}"
          f"{mm['extra_rss_over_fwd_bwd_bytes']['dense'] / mm['dense_fp32_gradients_bytes']:>10.3f}   <= 0.10")
    print(f"{'functional measure (mean / min)':<34}{h['functional_mean']:>10.3f}{h['functional_min']:>10.3f}   >= 0.95")
    print(f"{'frozen offset, fwd+bwd cost':<34}{h['offset_step_overhead']:>+10.3f}{'':>10}   <= +0.05")
    print(f"{'local training vs FedIT (offset)':<34}{h['local_training_fedsmoothlora_vs_fedit'] - 1:>+10.3f}{'':>10}"
          "   <= +0.05")
    print(f"[ga_cost] wrote {out_dir / 'ga_cost.json'} and ga_cost.png ({result['seconds']:.0f} s; load at start "
          f"{load_start[0]:.1f})")
    return result


if __name__ == "__main__":
    main()
