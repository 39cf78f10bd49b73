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
``g^T x`` over 1024 tokens with a 1/i singular spectrum (like SmolLM2's: s_16/s_1 ~ 0.06).

    python benchmarks/ga_cost.py            # SmolLM2-135M + 7B shapes, ~5 min on 2 cores
    python benchmarks/ga_cost.py --smoke    # tiny Llama + small shapes, seconds (CI)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, ROOT, machine, pyplot  # noqa: E402

# isort: split

import subprocess  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402

from benchmarks.overhead import PeakRSS, build_data, lora_model, training_args  # noqa: E402
from fedsmooth_hf import FederatedArguments, FederatedTrainer  # noqa: E402
from fedsmooth_hf.adapter import clear_offsets, get_lora_factors, lora_layers, set_offsets  # noqa: E402
from fedsmooth_hf.gradients import estimate_gradient_subspaces  # noqa: E402
from fedsmooth_hf.sketch import DenseGradient, SketchedGradient, TestMatrices, sketch_sizes  # noqa: E402
from fedsmooth_hf.strategies import get_strategy  # noqa: E402

SEVEN_B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
MIB = 2**20


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


# ---------------------------------------------------------------------- accuracy of one estimate
def ga_metrics(G: torch.Tensor, U: torch.Tensor, V: torch.Tensor, Ue: torch.Tensor, Ve: torch.Tensor, r: int) -> dict:
    """Sketched (U, V) vs exact (Ue, Ve) top-2r vectors of G: product error, angles, functional measure."""
    G, U, V, Ue, Ve = (t.double() for t in (G, U, V, Ue, Ve))
    sign = torch.sign((U * Ue).sum(0) + (V * Ve).sum(0))  # an SVD's vectors are defined up to a joint sign
    sign[sign == 0] = 1
    U, V = U * sign, V * sign
    P, Pe = U[:, r:2 * r] @ V[:, :r].T, Ue[:, r:2 * r] @ Ve[:, :r].T

    def angle(A, B):
        return math.degrees(math.acos(float(torch.linalg.svdvals(A.T @ B).min().clamp(max=1.0))))

    def energy(Ux, Vx):
        return float((Ux[:, r:2 * r].T @ G).norm() ** 2 + (G @ Vx[:, :r]).norm() ** 2)

    return {"rel_frobenius_BA": float((P - Pe).norm() / Pe.norm()), "angle_U_deg": angle(U, Ue),
            "angle_V_deg": angle(V, Ve), "functional": energy(U, V) / energy(Ue, Ve)}


def summarize_metrics(rows: list[dict]) -> dict:
    out = {}
    for key in ("rel_frobenius_BA", "angle_U_deg", "angle_V_deg", "functional"):
        v = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        out[key] = {"mean": float(v.mean()), "median": float(v.median()), "min": float(v.min()), "max": float(v.max())}
    return out


def exact_top(G: torch.Tensor, q: int):
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U[:, :q], Vh[:q].T


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
    offsets = {n: (torch.randn(l_.out_features, rank, generator=gen) * 1e-3, torch.randn(rank, l_.in_features, generator=gen))
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
        "model": kind, "layers": len(layers), "rank": rank, "ga_samples": ga_samples, "batch": batch, "seq_len": seq_len,
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


# ---------------------------------------------------------------------- LLaMA-7B shapes, synthetic gradients
def synthetic_stream(d_out: int, d_in: int, tokens: int, batch_tokens: int, latent: int, seed: int = 0):
    """Batches of (x, g) whose G = sum g^T x has singular values ~ 1/i (x, g weighted 1/sqrt(i) in
    random orthonormal bases of ``latent`` directions, plus 1% isotropic noise), and the exact top
    factors of G from the stacked token factors (G = g_all^T x_all, an exact factored SVD)."""
    gen = torch.Generator().manual_seed(seed)
    Bu, _ = torch.linalg.qr(torch.randn(d_out, latent, generator=gen))
    Bv, _ = torch.linalg.qr(torch.randn(d_in, latent, generator=gen))
    w = (torch.arange(latent, dtype=torch.float32) + 1) ** -0.5
    xs, gs = [], []
    for _ in range(tokens // batch_tokens):
        c = torch.randn(batch_tokens, latent, generator=gen) * w
        xs.append(c @ Bv.T + 0.01 * torch.randn(batch_tokens, d_in, generator=gen) / math.sqrt(d_in))
        gs.append(c @ Bu.T + 0.01 * torch.randn(batch_tokens, d_out, generator=gen) / math.sqrt(d_out))
    return list(zip(xs, gs))


def exact_from_tokens(stream, q: int):
    """Exact top-q (U, V) of sum g^T x without the dense SVD: QR of the stacked token factors."""
    X = torch.cat([x for x, _ in stream]).double()
    Gt = torch.cat([g for _, g in stream]).double()
    Qg, Rg = torch.linalg.qr(Gt.T)
    Qx, Rx = torch.linalg.qr(X.T)
    Uc, _, Vch = torch.linalg.svd(Rg @ Rx.T)
    return Qg @ Uc[:, :q], Qx @ Vch[:q].T


def shapes_part(shapes, rank: int, tokens: int, batch_tokens: int, latent: int) -> list[dict]:
    q = 2 * rank
    rows = []
    for d_out, d_in in shapes:
        stream = synthetic_stream(d_out, d_in, tokens, batch_tokens, latent)
        Ue, Ve = exact_from_tokens(stream, q)
        out = {"shape": f"{d_out}x{d_in}", "tokens": tokens}
        for name in ("sketch", "dense"):
            gc.collect()
            start = psutil.Process().memory_info().rss
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                sizes = sketch_sizes(q, d_out, d_in)
                est = (SketchedGradient(d_out, d_in, *sizes, TestMatrices(0)) if name == "sketch"
                       else DenseGradient(torch.zeros(d_out, d_in)))
                for x, g in stream:
                    est.add(x, g)
                t1 = time.perf_counter()
                U, _, V = est.top_singular(q)
                t2 = time.perf_counter()
            out[name] = {"accumulate_s": t1 - t0, "top_singular_s": t2 - t1, "total_s": t2 - t0,
                         "state_bytes": est.nbytes, "peak_rss_rise_bytes": max(0, mem.peak - start)}
            if name == "sketch":
                out["sketch"]["k"], out["sketch"]["l"] = sizes
            G = sum(g.T @ x for x, g in stream) if name == "sketch" else est.grad
            out[name]["accuracy"] = ga_metrics(G, U, V, Ue, Ve, rank)
            del est, G
        out["speedup"] = out["dense"]["total_s"] / out["sketch"]["total_s"]
        out["memory_fraction"] = out["sketch"]["state_bytes"] / out["dense"]["state_bytes"]
        rows.append(out)
        print(f"[ga_cost] {out['shape']}: sketch {out['sketch']['total_s']:.2f} s vs dense {out['dense']['total_s']:.2f} s "
              f"({out['speedup']:.1f}x), memory {100 * out['memory_fraction']:.1f}%, functional "
              f"{out['sketch']['accuracy']['functional']:.3f} (dense path {out['dense']['accuracy']['functional']:.3f})",
              flush=True)
    return rows


# ---------------------------------------------------------------------- client rounds
def client_rounds(kind: str, rank: int, ga_samples: int, local_steps: int, batch: int, seq_len: int,
                  clients: int, rounds: int) -> dict:
    """FedSmoothLoRA (sketch, dense) vs FedIT: seconds per client round, from one trainer each."""
    ds, collator = calibration_data(kind, clients * max(ga_samples, batch * local_steps), seq_len)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, strategy, extra in [("fedit", "fedit", {}), ("fedsmoothlora_sketch", "fedsmoothlora", {}),
                                       ("fedsmoothlora_dense", "fedsmoothlora", {"ga_estimator": "dense"})]:
            fed = FederatedArguments(strategy=strategy, num_clients=clients, num_rounds=rounds, local_steps=local_steps,
                                     lora_r=rank, lora_alpha=2 * rank, ga_samples=ga_samples, ga_batch_size=batch,
                                     eval_rounds=0, **extra)
            args = training_args(tmp, batch)
            trainer = FederatedTrainer(model=lora_model(kind, rank), args=args, fed_args=fed, train_dataset=ds,
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


# ---------------------------------------------------------------------- plot
def plot(result: dict, path: Path) -> None:
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny Llama and small shapes: seconds (CI)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--rounds", type=int, default=1, help="federated rounds per client-round timing")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                   help="torch threads; 1 by default: on a loaded machine, 2 threads made LAPACK calls 100x slower")
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
    shape_rows = shapes_part(shapes, rank, tokens=1024 if not a.smoke else 256, batch_tokens=512 if not a.smoke else 128,
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
    print(f"{'GA start / plain fwd+bwd':<34}{h['ga_start_sketch_vs_fwd_bwd']:>10.2f}{h['ga_start_dense_vs_fwd_bwd']:>10.2f}"
          "   <= 2.0")
    print(f"{'client round / FedIT':<34}{h['client_round_sketch_vs_fedit']:>10.2f}{h['client_round_dense_vs_fedit']:>10.2f}"
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
