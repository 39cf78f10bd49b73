"""How much of a merged update survives in a 4-bit (NF4) or bf16 base: requantize vs our residual.

A federated round ends with ``W <- W + s*B@A``. On an NF4 base the obvious merge
(dequantize, add, requantize) rounds a small update away; on a bf16 base the
in-place add rounds it to 8 mantissa bits. This measures, for update sizes
``||dW|| / ||W||`` typical of one round, the fraction of the update that survives

* one merge, and
* ten merges in a row (the cumulative update after ten rounds),

for: NF4 requantize (the naive merge), bf16 in-place add, and fedsmooth_hf's
merge on a real bitsandbytes ``Linear4bit`` layer (a full-precision low-rank
residual kept beside the 4-bit weight), plus the residual's memory next to the
packed 4-bit weight. Run on CPU or CUDA::

    python benchmarks/qlora_merge.py [--device cuda] [--size 1024]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR  # noqa: E402
from recipes.plots import pyplot  # noqa: E402

# isort: split

import torch  # noqa: E402

from fedsmooth_hf.model.adapter import lora_layers, lora_scaling  # noqa: E402
from fedsmooth_hf.model.merge import base_residual, dense_base_weight, merge_into_base  # noqa: E402

RELATIVE_SIZES = (1e-4, 1e-3, 1e-2, 1e-1)
ROUNDS = 10


def retained(effective_change: torch.Tensor, update: torch.Tensor) -> float:
    """Projection of what the weight really moved onto the intended update (1.0 = kept exactly)."""
    return float((effective_change * update).sum() / (update * update).sum())


def relative_error(effective_change: torch.Tensor, update: torch.Tensor) -> float:
    return float(torch.linalg.norm(effective_change - update) / torch.linalg.norm(update))


def build_4bit_layer(size: int, rank: int, device: str):
    """One real NF4 ``Linear4bit`` (loaded through ``from_pretrained``) wrapped by PEFT LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=size, intermediate_size=size, num_hidden_layers=1,
                         num_attention_heads=max(1, size // 64), num_key_value_heads=max(1, size // 64),
                         tie_word_embeddings=True)
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(config).save_pretrained(tmp)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=bnb,
                                                     device_map={"": device} if device != "cpu" else None)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=["o_proj"]))
    (name, layer), = lora_layers(model).items()
    return model, name, layer


def requantize(W: torch.Tensor, like) -> torch.Tensor:
    """Dequantize(quantize(W)) with the layer's own NF4 block size: the naive merge's rounding."""
    import bitsandbytes.functional as bnbF

    state = like.weight.quant_state
    q, s = bnbF.quantize_4bit(W.contiguous(), blocksize=state.blocksize, quant_type=state.quant_type)
    return bnbF.dequantize_4bit(q, s).float()


def run(size: int, rank: int, device: str) -> dict:
    model, name, layer = build_4bit_layer(size, rank, device)
    base = layer.get_base_layer()
    W0 = dense_base_weight(layer).to(device)  # the dequantized starting weight Q(W)
    s = lora_scaling(layer)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for rel in RELATIVE_SIZES:
        updates = []
        for _ in range(ROUNDS):
            B = torch.randn(size, rank, generator=gen)
            A = torch.randn(rank, size, generator=gen)
            scale = rel * float(torch.linalg.norm(W0)) / float(torch.linalg.norm(s * B @ A))
            updates.append((B * scale, A))
        dense = [(s * B @ A).to(device) for B, A in updates]
        total = torch.stack(dense).sum(0)

        naive = requantize(W0 + dense[0], base) - W0
        naive_w = W0.clone()
        for d in dense:
            naive_w = requantize(naive_w + d, base)
        bf16_w = W0.to(torch.bfloat16)
        bf16_one = (bf16_w.float() + dense[0]).to(torch.bfloat16).float() - bf16_w.float()
        for d in dense:
            bf16_w = (bf16_w.float() + d).to(torch.bfloat16)

        res = base_residual(layer)
        if res is not None:
            res.B = res.A = None
        t0 = time.perf_counter()
        merge_into_base({name: layer}, {name: updates[0]})
        ours_one = dense_base_weight(layer).to(device) - W0
        for B, A in updates[1:]:
            merge_into_base({name: layer}, {name: (B, A)})
        merge_s = (time.perf_counter() - t0) / ROUNDS
        ours = dense_base_weight(layer).to(device) - W0
        res = base_residual(layer)
        rows.append({
            "relative_update": rel,
            "nf4_requantize_one": retained(naive, dense[0]),
            "nf4_requantize_ten": retained(naive_w - W0, total),
            "bf16_add_one": retained(bf16_one, dense[0]),
            "bf16_add_ten": retained(bf16_w.float() - W0.to(torch.bfloat16).float(), total),
            "residual_one": retained(ours_one, dense[0]),
            "residual_ten": retained(ours, total),
            "residual_ten_rel_error": relative_error(ours, total),
            "residual_rank": int(res.B.shape[1]),
            "residual_bytes": int(res.B.numel() * 4 + res.A.numel() * 4),
            "merge_time_s": merge_s,
        })
    packed = base.weight.numel() * base.weight.element_size()
    return {"device": device, "size": size, "rank": rank, "rounds": ROUNDS, "packed_4bit_bytes": int(packed),
            "rows": rows}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    rels = [r["relative_update"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, label, style in [("nf4_requantize_ten", "NF4 dequantize-add-requantize", "o-"),
                              ("bf16_add_ten", "bf16 in-place add", "s-"),
                              ("residual_ten", "fedsmooth_hf residual (4-bit base)", "^-")]:
        ax.plot(rels, [r[key] for r in result["rows"]], style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("update size per round  ||dW|| / ||W||")
    ax.set_ylabel(f"fraction kept after {result['rounds']} merges")
    ax.set_ylim(-0.05, 1.1)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_title(f"Merged update retained ({result['size']}x{result['size']}, r={result['rank']}, {result['device']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--out", default=str(RESULTS_DIR))
    a = p.parse_args()
    result = run(a.size, a.rank, a.device)
    print(f"{'update':>8} | {'NF4 requant 1x':>14} {'10x':>6} | {'bf16 add 1x':>11} {'10x':>6} | "
          f"{'residual 1x':>11} {'10x':>8} | residual MiB")
    for r in result["rows"]:
        print(f"{r['relative_update']:8.0e} | {r['nf4_requantize_one']:14.3f} {r['nf4_requantize_ten']:6.3f} | "
              f"{r['bf16_add_one']:11.3f} {r['bf16_add_ten']:6.3f} | {r['residual_one']:11.6f} "
              f"{r['residual_ten']:8.6f} | {r['residual_bytes'] / 2**20:.2f}")
    print(f"packed 4-bit weight: {result['packed_4bit_bytes'] / 2**20:.2f} MiB; the residual after {ROUNDS} merges "
          f"of rank {a.rank} is rank {result['rows'][-1]['residual_rank']}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "" if a.device == "cpu" else f"_{a.device}"
    (out / f"qlora_merge{tag}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"qlora_merge{tag}.png")
    print(f"wrote {out / f'qlora_merge{tag}.json'} and .png")


if __name__ == "__main__":
    main()
