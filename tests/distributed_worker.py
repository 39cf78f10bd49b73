"""One process of a multi-process federated run, for tests and benchmarks under ``accelerate launch``.

Every rank writes ``rank<r>.json`` with a checksum of the full (gathered) global
model after each round, and rank 0 writes ``final.safetensors``; the tests
compare ranks with each other and with a single-process run of the same seed.

``--model tiny`` (the default, the tests' size) trains a 2-layer Llama from a config on the
counting task; ``--model smollm2`` trains SmolLM2-135M-Instruct (the offline checkpoint the
recipes use, no download) on the shipped WordNet definitions, every row padded to ``--seq_len``
tokens so each step costs the same (``benchmarks/client_parallel.py --model smollm2``).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import save_file  # noqa: E402
from support.tiny import make_counting_dataset, make_tiny_llama  # noqa: E402
from transformers import AutoModelForCausalLM, TrainingArguments  # noqa: E402

from fedsmooth_hf import FederatedArguments, FederatedCallback, FederatedTrainer  # noqa: E402


def zero_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                   "weight_decay": "auto"}},
    }


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def live_deepspeed_engines() -> int:
    """DeepSpeed engines still alive (a released local round's engine must be collectable)."""
    if "deepspeed" not in sys.modules:
        return 0
    from deepspeed.runtime.engine import DeepSpeedEngine

    gc.collect()
    return sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects())


# what differs between the two model sizes (the tiny values are the ones the tests were written for)
SETTINGS = {
    "tiny": {"lora_r": 4, "learning_rate": 5e-3, "ga_samples": 8, "ga_batch_size": 4, "save_rounds": 0},
    "smollm2": {"lora_r": 8, "learning_rate": 5e-4, "ga_samples": 16, "ga_batch_size": 8, "save_rounds": -1},
}
EVAL_EXAMPLES = 16  # held-out rows, both sizes


def wordnet_rows(split: str, n: int, seq_len: int):
    """``n`` WordNet definition rows for SmolLM2, chat-formatted, the prompt masked out of the labels,
    right-padded to exactly ``seq_len`` tokens (median 47 before padding at ``seq_len`` 64).

    Args:
        split (`str`): `"train"` or `"eval"` (no shared instruction).
        n (`int`): Rows (the train split has 7,501, the eval split 833).
        seq_len (`int`): Tokens per row; longer rows are truncated.

    Raises:
        `ValueError`: fewer than ``n`` rows keep a token of their gloss within ``seq_len``.
    """
    from transformers import AutoTokenizer

    from recipes.nlg_llama import ModelDataArguments, tokenize_dataset
    from recipes.offline_assets import load_wordnet_instructions, smollm2_checkpoint

    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    rows = load_wordnet_instructions(split).shuffle(seed=0)
    rows = rows.select(range(min(len(rows), 2 * n)))
    ds = tokenize_dataset(rows, tok, ModelDataArguments(max_length=seq_len), keep=())
    if len(ds) < n:
        raise ValueError(f"--seq_len {seq_len} leaves {len(ds)} WordNet {split} rows, {n} asked for (the chat prompt "
                         "alone is ~37 tokens): use a longer --seq_len or fewer --examples")
    ds = ds.select(range(n))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def padded(row):
        extra = seq_len - len(row["input_ids"])
        return {"input_ids": row["input_ids"] + [pad] * extra, "attention_mask": row["attention_mask"] + [0] * extra,
                "labels": row["labels"] + [-100] * extra}

    return ds.map(padded)


def build(a) -> tuple:
    """(model, train data, eval data) of ``--model``.

    Args:
        a (`argparse.Namespace`): The worker's arguments (`model`, `examples`, `seq_len`).
    """
    if a.model == "tiny":
        return make_tiny_llama(), make_counting_dataset(a.examples), make_counting_dataset(EVAL_EXAMPLES, seed=1)
    from recipes.offline_assets import smollm2_checkpoint

    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32)
    return model, wordnet_rows("train", a.examples, a.seq_len), wordnet_rows("eval", EVAL_EXAMPLES, a.seq_len)


class RoundRecorder(FederatedCallback):
    """Per round: digest and sum of the gathered global weights, RSS, wall time.

    ``time_s`` is the wall time since the recorder was made less the recorder's own work (the
    digest of the merged model takes seconds at SmolLM2's size), so the time between two rounds'
    ``time_s`` is the federation's alone.
    """

    def __init__(self, trainer_ref: list):
        self.trainer_ref = trainer_ref
        self.rounds: list[dict] = []
        self.t0 = time.perf_counter()

    def on_round_end(self, args, state, control, round=None, metrics=None, **kwargs):  # noqa: A002
        if round == 0:
            return
        stamp = time.perf_counter()
        trainer = self.trainer_ref[0]
        weights = trainer.merged_state_dict()
        digest = hashlib.sha256()
        total = 0.0
        for name in sorted(weights):
            t = weights[name].detach().float().cpu().contiguous()
            digest.update(name.encode())
            digest.update(t.numpy().tobytes())
            total += float(t.double().sum())
        self.rounds.append({"round": round, "sha256": digest.hexdigest(), "sum": total, "rss_mib": rss_mib(),
                            "live_engines": live_deepspeed_engines(),
                            "time_s": stamp - self.t0,
                            "eval_loss": (metrics or {}).get("eval_loss")})
        self.t0 += time.perf_counter() - stamp


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--zero_stage", type=int, default=0)
    p.add_argument("--strategy", default="fedsmoothlora")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--local_steps", type=int, default=3)
    p.add_argument("--client_parallel", action="store_true")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=4, help="per process")
    p.add_argument("--model", choices=sorted(SETTINGS), default="tiny",
                   help="tiny: 2-layer Llama from a config; smollm2: SmolLM2-135M-Instruct offline, WordNet text")
    p.add_argument("--seq_len", type=int, default=64, help="tokens per row (smollm2)")
    a = p.parse_args()
    size = SETTINGS[a.model]

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, data, eval_data = build(a)
    args = TrainingArguments(
        output_dir=str(out / "run"), per_device_train_batch_size=a.batch_size, per_device_eval_batch_size=8,
        learning_rate=size["learning_rate"], seed=0, report_to="none", disable_tqdm=True, logging_steps=1,
        deepspeed=zero_config(a.zero_stage) if a.zero_stage else None, use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
    )
    fed = FederatedArguments(strategy=a.strategy, num_clients=a.clients, num_rounds=a.rounds,
                             local_steps=a.local_steps, lora_r=size["lora_r"], lora_alpha=2 * size["lora_r"],
                             ga_samples=size["ga_samples"], ga_batch_size=size["ga_batch_size"],
                             save_rounds=size["save_rounds"], client_parallel=a.client_parallel)
    ref: list = []
    recorder = RoundRecorder(ref)
    trainer = FederatedTrainer(model=model, args=args, fed_args=fed, train_dataset=data, eval_dataset=eval_data,
                               callbacks=[recorder])
    ref.append(trainer)
    trainer.train()
    rank = trainer.args.process_index
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world_size": trainer.args.world_size,
                                                       "rounds": recorder.rounds,
                                                       "round_history": trainer.round_history}, indent=1))
    # cloned: safetensors refuses tied weights (SmolLM2 shares embed_tokens and lm_head)
    weights = {k: v.detach().float().cpu().clone() for k, v in trainer.merged_state_dict().items()}
    if rank == 0:
        save_file(weights, str(out / "final.safetensors"))
    if torch.distributed.is_initialized():
        # leave together: a rank exiting while the other still talks to it aborts in the gloo threads
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # Every result is on disk. Skip interpreter finalization: under load, native worker threads
    # (gloo/DeepSpeed) destroyed there can abort the process ("terminate called without an active
    # exception", seen once under ZeRO-3 after both rounds had finished) and fail a run that succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
