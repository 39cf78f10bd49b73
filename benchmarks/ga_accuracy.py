"""The Gradient-Aligned start's accuracy measures, and the GA cost benchmark's LLaMA-7B-shape part.

``ga_metrics`` compares a sketched top-2r subspace of a gradient with the exact one: relative
Frobenius error of ``B_ga A_ga`` (signs aligned), largest principal angles of ``span U[:, :2r]``
and ``span V[:, :2r]``, and the functional measure (the gradient energy a first LoRA step moves
along, relative to the exact factors'). ``shapes_part`` times and measures the sketched and dense
estimates at LLaMA-7B shapes on synthetic gradients with a 1/i singular spectrum. Used by
benchmarks/ga_cost.py.
"""

from __future__ import annotations

import gc
import math
import time

import psutil
import torch

from benchmarks.overhead import PeakRSS
from fedsmooth_hf.math.sketch import DenseGradient, SketchedGradient, TestMatrices, sketch_sizes

SEVEN_B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


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
        sketch, dense = out["sketch"], out["dense"]
        print(f"[ga_cost] {out['shape']}: sketch {sketch['total_s']:.2f} s vs dense {dense['total_s']:.2f} s "
              f"({out['speedup']:.1f}x), memory {100 * out['memory_fraction']:.1f}%, functional "
              f"{sketch['accuracy']['functional']:.3f} (dense path {dense['accuracy']['functional']:.3f})",
              flush=True)
    return rows
