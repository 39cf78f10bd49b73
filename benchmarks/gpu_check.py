"""One-command GPU check: a LLaMA model at 1B-scale shapes (random weights from a config, no download) on CUDA in bf16.

Measured side by side in one process (alternating repeats, medians):

* ``federated``: wall time of FedIT and FedSmoothLoRA runs (K clients x R rounds x S local steps) and of a
  plain ``transformers.Trainer`` doing the same optimizer steps on the same data; their ratios, and tokens/s
  per client step (the local rounds' tokens over their training time) vs the plain Trainer's tokens/s;
* ``ga_start``: the Gradient-Aligned start (calibration pass with the gradient sketches + the strategy's
  client start) vs one plain forward+backward over the same ``ga_samples``: time and peak memory (CUDA: peak
  allocated bytes above the model; CPU: peak live heap);
* ``qlora``: the 4-bit path end to end when bitsandbytes is installed: the random model saved and reloaded in
  NF4, one FedSmoothLoRA round, and how much of the merged update the 4-bit base keeps (the effective
  weight's change vs ``s B_s A_s``, over the first and last blocks' layers).

Writes one JSON (``gpu_check.json``, or ``gpu_check_cpu_small.json``) and prints one table. Without CUDA, or
with ``--cpu-small``, it runs the same code on a small Llama in fp32 on the CPU (the CI test,
``tests/bench/test_gpu_check.py``).

    python benchmarks/gpu_check.py               # CUDA, bf16, 1B shapes: a few minutes on one H100
    python benchmarks/gpu_check.py --cpu-small   # CPU, fp32, a small Llama, well under a minute
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, machine  # noqa: E402

# isort: split

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from benchmarks.overhead import build_data  # noqa: E402
from fedsmooth_hf import FederatedArguments, FederatedLoraConfig, FederatedTrainer, FedSmoothLoRAConfig  # noqa: E402
from fedsmooth_hf.model.adapter import find_target_modules, get_lora_factors, lora_layers  # noqa: E402
from fedsmooth_hf.model.gradients import estimate_gradient_subspaces  # noqa: E402
from fedsmooth_hf.strategies import get_strategy  # noqa: E402


@dataclass
class Size:
    """The model and the federation of one check."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq_len: int
    batch: int
    clients: int
    rounds: int
    local_steps: int
    ga_samples: int
    rank: int
    repeats: int


#: TinyLlama-1.1B's shapes (hidden 2048, MLP 5632, 22 layers, 32 heads, 4 KV heads, 32k vocabulary)
GPU_1B = Size(2048, 5632, 22, 32, 4, 32000, 512, 8, 2, 2, 10, 16, 16, 2)
CPU_SMALL = Size(128, 256, 2, 4, 2, 512, 32, 4, 2, 2, 2, 8, 4, 1)


def llama_config(size: Size) -> LlamaConfig:
    return LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                       num_hidden_layers=size.layers, num_attention_heads=size.heads,
                       num_key_value_heads=size.kv_heads, max_position_embeddings=max(2048, size.seq_len))


def build_base(size: Size, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """Random weights, initialised directly on ``device`` (a 1B model initialised on a CPU takes minutes)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(llama_config(size), dtype=dtype)
    return model.eval()


def lora_wrap(base, rank: int, method: FedSmoothLoRAConfig | None = None):
    from peft import get_peft_model

    config = FederatedLoraConfig(r=rank, lora_alpha=2 * rank, target_modules=find_target_modules(base),
                                 fedsmoothlora_config=method)
    return get_peft_model(base, config)


def training_args(out: str, size: Size, cuda: bool) -> TrainingArguments:
    return TrainingArguments(output_dir=out, per_device_train_batch_size=size.batch, learning_rate=1e-4,
                             lr_scheduler_type="constant", logging_steps=10**6, report_to="none", use_cpu=not cuda,
                             bf16=cuda, disable_tqdm=True, save_strategy="no", seed=0, dataloader_num_workers=0)


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def run_plain(base, data, size: Size, cuda: bool, tmp: str) -> dict:
    model = lora_wrap(copy.deepcopy(base), size.rank)
    args = training_args(tmp, size, cuda)
    args.max_steps = size.clients * size.rounds * size.local_steps
    trainer = Trainer(model=model, args=args, train_dataset=data)
    _sync(cuda)
    t0 = time.perf_counter()
    trainer.train()
    _sync(cuda)
    wall = time.perf_counter() - t0
    tokens = args.max_steps * size.batch * size.seq_len
    del trainer, model
    return {"wall_s": wall, "tokens_per_s": tokens / wall}


def run_federated(base, data, strategy: str, size: Size, cuda: bool, tmp: str) -> dict:
    method = FedSmoothLoRAConfig(ga_samples=size.ga_samples, ga_batch_size=size.batch)
    fed = FederatedArguments(strategy=strategy, num_clients=size.clients, num_rounds=size.rounds,
                             local_steps=size.local_steps, lora_r=size.rank, lora_alpha=2 * size.rank, eval_rounds=0)
    trainer = FederatedTrainer(model=lora_wrap(copy.deepcopy(base), size.rank, method),
                               args=training_args(tmp, size, cuda), fed_args=fed, train_dataset=data)
    trainer.remove_callback(PrinterCallback)
    _sync(cuda)
    t0 = time.perf_counter()
    trainer.train()
    _sync(cuda)
    wall = time.perf_counter() - t0
    history = trainer.round_history
    local = sum(r["local_train_time_s"] for r in history)
    tokens = size.clients * size.rounds * size.local_steps * size.batch * size.seq_len
    out = {"wall_s": wall, "local_train_time_s": local,
           "strategy_overhead_s": sum(r["strategy_overhead_s"] for r in history),
           "client_step_tokens_per_s": tokens / local}
    del trainer
    return out


def federated_part(base, data, size: Size, cuda: bool, tmp: str) -> dict:
    warm = Size(**{**asdict(size), "clients": 1, "rounds": 1, "local_steps": 2})
    run_plain(base, data, warm, cuda, tmp)  # untimed: first-call costs (kernels, allocator) would land on plain
    runs = {"plain": [], "fedit": [], "fedsmoothlora": []}
    for _ in range(size.repeats):
        runs["plain"].append(run_plain(base, data, size, cuda, tmp))
        for strategy in ("fedit", "fedsmoothlora"):
            runs[strategy].append(run_federated(base, data, strategy, size, cuda, tmp))
            gc.collect()
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    return {"runs": runs, "median": med,
            "fedsmoothlora_vs_fedit_wall": med["fedsmoothlora"]["wall_s"] / med["fedit"]["wall_s"],
            "fedit_vs_plain_wall": med["fedit"]["wall_s"] / med["plain"]["wall_s"],
            "fedsmoothlora_vs_plain_wall": med["fedsmoothlora"]["wall_s"] / med["plain"]["wall_s"],
            "client_step_tokens_per_s_vs_plain": {
                s: med[s]["client_step_tokens_per_s"] / med["plain"]["tokens_per_s"]
                for s in ("fedit", "fedsmoothlora")}}


class _PeakMemory:
    """Peak bytes above the start: CUDA's allocator statistics, or the live heap on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        if not cuda:
            from benchmarks.ga_cost import PeakHeap

            self._heap = PeakHeap()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self._heap.__enter__()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_rise = torch.cuda.max_memory_allocated() - self.start
        else:
            self._heap.__exit__(*exc)
            self.peak_rise = self._heap.peak - self._heap.start


def ga_part(base, data, size: Size, cuda: bool) -> dict:
    """The GA start vs one plain forward+backward over the same calibration batches, alternating."""
    model = lora_wrap(copy.deepcopy(base), size.rank)
    layers = lora_layers(model)
    device = next(model.parameters()).device
    rows = [data[i] for i in range(size.ga_samples)]
    batches = [{k: torch.tensor([r[k] for r in rows[j: j + size.batch]], device=device)
                for k in ("input_ids", "labels")} for j in range(0, size.ga_samples, size.batch)]
    strategy = get_strategy("fedsmoothlora", rank=size.rank)
    strategy.setup(get_lora_factors(layers))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def plain():
        model.train()
        with autocast:
            for b in batches:
                model(**b).loss.backward()
        model.zero_grad(set_to_none=True)

    def ga_start():
        with autocast:
            est = estimate_gradient_subspaces(model, layers, batches, **strategy.gradient_request())
        strategy.client_start(0, est)
        strategy._offsets.clear()  # no upload follows

    plain()  # warm-up (kernels, allocator)
    times = {"plain_fwd_bwd": [], "ga_start": []}
    peaks = {"plain_fwd_bwd": [], "ga_start": []}
    for _ in range(max(2, size.repeats)):
        for name, fn in (("plain_fwd_bwd", plain), ("ga_start", ga_start)):
            gc.collect()
            with _PeakMemory(cuda) as mem:
                t0 = time.perf_counter()
                fn()
                _sync(cuda)
                times[name].append(time.perf_counter() - t0)
            peaks[name].append(mem.peak_rise)
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: max(v) for k, v in peaks.items()}
    return {"seconds": times, "median_s": med, "peak_bytes_above_model": peak,
            "time_ratio": med["ga_start"] / med["plain_fwd_bwd"],
            "peak_memory_ratio": peak["ga_start"] / peak["plain_fwd_bwd"] if peak["plain_fwd_bwd"] > 0 else None}


def qlora_part(base, data, size: Size, cuda: bool, tmp: str) -> dict:
    """NF4 base (bitsandbytes), one FedSmoothLoRA round, retention of the merged update in the 4-bit layers."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        return {"ran": False, "reason": f"bitsandbytes is not installed ({err})"}
    from fedsmooth_hf.model.merge import dense_base_weight, is_quantized

    path = Path(tmp) / "random-llama"
    base.save_pretrained(path)
    compute = torch.bfloat16 if cuda else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    t0 = time.perf_counter()
    q = LlamaForCausalLM.from_pretrained(path, quantization_config=quant, dtype=compute,
                                         device_map={"": 0} if cuda else {"": "cpu"})
    load_s = time.perf_counter() - t0
    method = FedSmoothLoRAConfig(ga_samples=size.ga_samples, ga_batch_size=size.batch)
    fed = FederatedArguments(strategy="fedsmoothlora", num_clients=size.clients, num_rounds=1,
                             local_steps=size.local_steps, lora_r=size.rank, lora_alpha=2 * size.rank, eval_rounds=0)
    trainer = FederatedTrainer(model=lora_wrap(q, size.rank, method), args=training_args(tmp, size, cuda),
                               fed_args=fed, train_dataset=data)
    trainer.remove_callback(PrinterCallback)
    last = size.layers - 1
    watched = {n: layer for n, layer in trainer.layers.items() if ".layers.0." in n or f".layers.{last}." in n}
    before = {n: dense_base_weight(layer).cpu() for n, layer in watched.items()}
    merged = {}
    apply = trainer.apply_server_update

    def capture(update, *args, **kwargs):
        merged.update(update.merge)
        return apply(update, *args, **kwargs)

    trainer.apply_server_update = capture
    t0 = time.perf_counter()
    trainer.train()
    _sync(cuda)
    round_s = time.perf_counter() - t0
    kept, errors = [], []
    for n, layer in watched.items():
        B, A = merged[n]
        intended = float(layer.scaling["default"]) * (B.float().cpu() @ A.float().cpu())
        change = dense_base_weight(layer).cpu() - before[n]
        kept.append(float((change * intended).sum() / intended.pow(2).sum()))
        errors.append(float((change - intended).norm() / intended.norm()))
    quantized = sum(is_quantized(layer.get_base_layer()) for layer in trainer.layers.values())
    out = {"ran": True, "device": "cuda" if cuda else "cpu", "quantized_layers": quantized,
           "layers_checked": len(watched), "load_4bit_s": load_s, "round_s": round_s,
           "train_loss": trainer.round_history[-1].get("train_loss"),
           "retention_mean": statistics.mean(kept), "retention_min": min(kept),
           "relative_error_max": max(errors)}
    del trainer, q
    return out


def table(result: dict) -> str:
    f, g, q = result["federated"], result["ga_start"], result["qlora"]
    rows = [
        ("FedSmoothLoRA / FedIT wall", f"{f['fedsmoothlora_vs_fedit_wall']:.3f}x"),
        ("FedIT / plain Trainer wall", f"{f['fedit_vs_plain_wall']:.3f}x"),
        ("FedSmoothLoRA / plain Trainer wall", f"{f['fedsmoothlora_vs_plain_wall']:.3f}x"),
        ("tokens/s per client step / plain, FedIT",
         f"{f['client_step_tokens_per_s_vs_plain']['fedit']:.3f}x"),
        ("tokens/s per client step / plain, FedSmoothLoRA",
         f"{f['client_step_tokens_per_s_vs_plain']['fedsmoothlora']:.3f}x"),
        ("GA start / plain fwd+bwd, time", f"{g['time_ratio']:.3f}x"),
        ("GA start / plain fwd+bwd, peak memory",
         "n/a" if g["peak_memory_ratio"] is None else f"{g['peak_memory_ratio']:.3f}x"),
        ("QLoRA merge retention (mean / min)",
         f"{q['retention_mean']:.6f} / {q['retention_min']:.6f}" if q["ran"] else f"skipped: {q['reason']}"),
    ]
    width = max(len(k) for k, _ in rows) + 2
    s = result["settings"]
    head = (f"gpu_check on {result['device']} ({s['dtype']}): Llama {s['hidden']}x{s['layers']} layers, "
            f"{result['parameters'] / 1e9:.2f}B parameters, {s['clients']} clients x {s['rounds']} rounds x "
            f"{s['local_steps']} steps, batch {s['batch']} x {s['seq_len']} tokens, r={s['rank']}")
    return "\n".join([head] + [f"  {k:<{width}}{v}" for k, v in rows])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-small", action="store_true", help="CPU, fp32, a small Llama (also the default without CUDA)")
    p.add_argument("--no-qlora", action="store_true", help="skip the 4-bit part")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.cpu_small
    size = GPU_1B if cuda else CPU_SMALL
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(1)
    t_all = time.perf_counter()
    load_start = machine()["loadavg"]
    base = build_base(size, device, dtype)
    n_data = size.clients * max(size.ga_samples, size.batch * size.local_steps)
    data = build_data(n_data, size.vocab, size.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        federated = federated_part(base, data, size, cuda, tmp)
        ga = ga_part(base, data, size, cuda)
        qlora = {"ran": False, "reason": "--no-qlora"} if a.no_qlora else qlora_part(base, data, size, cuda, tmp)
    result = {
        "benchmark": "gpu_check", "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "machine": machine(), "loadavg_start": load_start,
        "settings": {**asdict(size), "dtype": str(dtype).replace("torch.", ""), "cpu_small": not cuda},
        "parameters": sum(p.numel() for p in base.parameters()),
        "federated": federated, "ga_start": ga, "qlora": qlora,
    }
    result["seconds"] = time.perf_counter() - t_all
    finite = [federated["fedsmoothlora_vs_fedit_wall"], ga["time_ratio"]]
    kept = not qlora["ran"] or qlora["retention_min"] > 0.99
    result["ok"] = all(math.isfinite(v) and v > 0 for v in finite) and kept
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_check" if cuda else "gpu_check_cpu_small"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"[gpu_check] {'ok' if result['ok'] else 'FAILED'} in {result['seconds']:.0f} s; wrote {out / name}.json")
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
