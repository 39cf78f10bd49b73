"""Does FedSmoothLoRA converge smoother and faster than the baselines? Side by side, on real data.

Every strategy runs on the same data, partition, model and TrainingArguments for each seed;
only ``--strategy`` (or, for the ablation, a FedSmoothLoRA option) changes. Per round it records
the global model's eval loss (and accuracy), and every client's per-step training loss
(``logging_steps=1`` and a :class:`ClientLossRecorder` callback), from which it derives:

* final metric, mean +- std over seeds;
* rounds to reach FedIT's final metric (FedIT's mean over seeds, same partition);
* smoothness: mean |eval_loss[t] - eval_loss[t-1]| over rounds t >= 2 (the first round's
  large drop is left out), and the number of rounds in which accuracy fell;
* inter-round client loss jump: a client's first training loss in a round minus its last
  training loss in its previous participation (signed mean and mean of the absolute value).

Tasks (each reuses its recipe's data loading, model and defaults)::

    python benchmarks/convergence.py --task vit            # Fashion-MNIST, small digits-pretrained ViT
    python benchmarks/convergence.py --task vit-ablation   # FedSmoothLoRA variants, Dirichlet 0.1
    python benchmarks/convergence.py --task nlg            # SmolLM2-135M, WordNet definitions
    python benchmarks/convergence.py --task nlg8           # the same over 8 rounds, 8 clients, 3 seeds
    python benchmarks/convergence.py --task nlg8-ablation  # FedSmoothLoRA variants on nlg8
    python benchmarks/convergence.py --task lm-cls         # SmolLM2-135M + new head, 10 WordNet categories
    python benchmarks/convergence.py --task lm-cls-ablation  # FedSmoothLoRA variants on lm-cls, label skew
    python benchmarks/convergence.py --task tiny           # tiny ViT from scratch on sklearn digits (seconds)
    python benchmarks/convergence.py --task vit --quick    # few rounds, 2 strategies, 1 seed

Results: ``benchmarks/results/convergence_<task>.json`` and ``.png``. ``--resume`` keeps the
runs already in the JSON (same settings) and only runs the missing ones, so a long sweep can be
continued after an interruption.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, pyplot  # noqa: E402
from benchmarks._common import machine as common_machine

# isort: split

import torch  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from fedsmooth_hf import FederatedTrainer  # noqa: E402
from fedsmooth_hf.callbacks import FederatedCallback  # noqa: E402
from fedsmooth_hf.strategies import available_strategies  # noqa: E402

CACHE_DIR = Path(os.environ.get("FEDSMOOTH_BENCH_CACHE", Path.home() / ".cache" / "fedsmooth_hf" / "bench"))
STRATEGIES = ["fedit", "ffa_lora", "fedex_lora", "flexlora", "frlora", "fedsmoothlora"]
REFERENCE = "fedit"

# lm-cls's label space: ten WordNet lexicographer categories of distinct domains (about 185 glosses each).
LM_CLS_CATEGORIES = ["noun.animal", "noun.plant", "noun.food", "noun.person", "noun.body", "noun.location",
                     "noun.artifact", "noun.time", "verb.motion", "verb.communication"]

# The ablation of both SmolLM2 tasks: FedIT, the defaults, then one part of FedSmoothLoRA changed at a time.
LM_ABLATION = {
    "fedit": {"strategy": "fedit"},
    "fedsmoothlora (defaults: zeta cosine 1->0)": {},
    "no Round-Matching (zeta=0)": {"zeta": 0.0},
    "no Gradient-Aligned (ga_init=False)": {"ga_init": False},
    "zeta constant": {"zeta_mode": "constant"},
}

# Per-task settings: recipe arguments (override the recipe's own defaults) and sweep sizes.
TASKS = {
    "vit": {
        "recipe": {"num_clients": 10, "clients_per_round": 5, "num_rounds": 20, "local_steps": 5,
                   "per_device_train_batch_size": 32, "per_device_eval_batch_size": 500,
                   "max_train_samples": 12000, "max_eval_samples": 2000, "ga_samples": 32},
        "partitions": {"dirichlet0.1": {"partition": "dirichlet", "dirichlet_alpha": 0.1},
                       "iid": {"partition": "iid"}},
        "seeds": 3,
        "metric": "eval_accuracy",
    },
    "vit-ablation": {
        "recipe": {"num_clients": 10, "clients_per_round": 5, "num_rounds": 20, "local_steps": 5,
                   "per_device_train_batch_size": 32, "per_device_eval_batch_size": 500,
                   "max_train_samples": 12000, "max_eval_samples": 2000, "ga_samples": 32},
        "partitions": {"dirichlet0.1": {"partition": "dirichlet", "dirichlet_alpha": 0.1}},
        "seeds": 1,
        "metric": "eval_accuracy",
        "reuses": "vit",
        # variant name -> FederatedArguments overrides of strategy fedsmoothlora
        "variants": {
            "full (zeta=1, gamma=64, ga_samples=32)": {},
            "no Round-Matching (zeta=0)": {"zeta": 0.0},
            "no Gradient-Aligned (ga_init=False)": {"ga_init": False},
            "zeta cosine 1->0": {"zeta_mode": "cosine", "min_zeta": 0.0},
            "gamma=16": {"gamma": 16.0},
            "gamma=256": {"gamma": 256.0},
            "ga_samples=8": {"ga_samples": 8},
            "ga_samples=64": {"ga_samples": 64},  # 128 > the smallest Dirichlet-0.1 client (114 examples, seed 0)
        },
    },
    # Which start should a client that skipped rounds get, and which cosine floor? FedIT beside each.
    "vit-participation": {
        "recipe": {"num_clients": 10, "num_rounds": 20, "local_steps": 5,
                   "per_device_train_batch_size": 32, "per_device_eval_batch_size": 500,
                   "max_train_samples": 12000, "max_eval_samples": 2000, "ga_samples": 32},
        "partitions": {f"dirichlet0.1-{k}of10": {"partition": "dirichlet", "dirichlet_alpha": 0.1,
                                                  "clients_per_round": k} for k in (5, 2)},
        "seeds": 3,
        "metric": "eval_accuracy",
        "variants": {
            "fedit": {"strategy": "fedit"},
            "fedsmoothlora stale=reset": {"stale_round_matching": "reset"},
            "fedsmoothlora stale=continuity": {"stale_round_matching": "continuity"},
            "fedsmoothlora stale=paper": {"stale_round_matching": "paper"},
            "fedsmoothlora min_zeta=0.5": {"min_zeta": 0.5},
            "fedsmoothlora exact_round_matching": {"exact_round_matching": "true"},
        },
        "skip": [("fedsmoothlora min_zeta=0.5", "dirichlet0.1-2of10"),
                 ("fedsmoothlora exact_round_matching", "dirichlet0.1-2of10")],
    },
    # A pretrained foundation model, a new head, label skew: the paper's image protocol on SmolLM2-135M.
    # Ten WordNet categories (a CIFAR-10-sized label space); cuts to fit 2 CPU cores: the first 6 of the
    # 30 pretrained decoder layers, LoRA on q_proj/v_proj only, 24-token inputs, 8 rounds x 4 steps.
    "lm-cls": {
        "recipe": {"num_clients": 10, "num_rounds": 8, "local_steps": 4, "learning_rate": 2e-3,
                   "backbone_layers": 6, "categories": ",".join(LM_CLS_CATEGORIES),
                   "per_device_train_batch_size": 8, "per_device_eval_batch_size": 64,
                   "max_length": 24, "ga_samples": 16, "ga_batch_size": 8,
                   "lora_r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                   "modules_to_save": ["score"]},
        "partitions": {"dirichlet0.1": {"partition": "dirichlet", "dirichlet_alpha": 0.1, "partition_column": "label"},
                       "dirichlet0.1-5of10": {"partition": "dirichlet", "dirichlet_alpha": 0.1,
                                              "partition_column": "label", "clients_per_round": 5},
                       "iid": {"partition": "iid"}},
        "strategies": ["fedit", "fedex_lora", "flexlora", "frlora", "fedsmoothlora"],
        "seeds": 3,
        "metric": "eval_accuracy",
    },
    # Which part of FedSmoothLoRA helps on the classifier? lm-cls's settings, label skew; its fedit and default reused.
    "lm-cls-ablation": {
        "recipe": None,  # lm-cls's
        "partitions": None,
        "seeds": 3,
        "metric": "eval_accuracy",
        "reuses": "lm-cls",
        "variants": LM_ABLATION,
    },
    "nlg": {
        "recipe": {"num_clients": 4, "clients_per_round": 4, "num_rounds": 3, "local_steps": 3,
                   "per_device_train_batch_size": 4, "per_device_eval_batch_size": 16,
                   "max_eval_samples": 32, "ga_samples": 8, "ga_batch_size": 8, "max_length": 64},
        "partitions": {"category": {"partition": "column", "partition_column": "category"}},
        "seeds": 1,
        "metric": "eval_loss",
    },
    # Generation over 8 rounds, every client every round (the paper's protocol); cuts for 2 CPU cores:
    # LoRA on q_proj/v_proj, 48-token sequences, batch 4, 32 held-out examples.
    "nlg8": {
        "recipe": {"num_clients": 8, "clients_per_round": 8, "num_rounds": 8, "local_steps": 3,
                   "per_device_train_batch_size": 4, "per_device_eval_batch_size": 16,
                   "max_eval_samples": 32, "ga_samples": 8, "ga_batch_size": 8, "max_length": 48,
                   "target_modules": ["q_proj", "v_proj"]},
        "partitions": {"category": {"partition": "column", "partition_column": "category"}},
        "seeds": 3,
        "metric": "eval_loss",
    },
    # Which part of FedSmoothLoRA helps on a pretrained LM? nlg8's settings; its fedit and default runs are reused.
    "nlg8-ablation": {
        "recipe": None,  # nlg8's
        "partitions": None,
        "seeds": 3,
        "metric": "eval_loss",
        "reuses": "nlg8",
        "variants": {**LM_ABLATION, "exact_round_matching": {"exact_round_matching": "true"}},
    },
    "tiny": {
        "recipe": {"num_clients": 4, "clients_per_round": 4, "num_rounds": 2, "local_steps": 3,
                   "per_device_train_batch_size": 16, "per_device_eval_batch_size": 200,
                   "ga_samples": 8, "ga_batch_size": 8, "lora_r": 2, "lora_alpha": 4},
        "partitions": {"dirichlet0.5": {"partition": "dirichlet", "dirichlet_alpha": 0.5}},
        "seeds": 1,
        "metric": "eval_accuracy",
    },
}
TASKS["nlg8-ablation"].update(recipe=TASKS["nlg8"]["recipe"], partitions=TASKS["nlg8"]["partitions"])
TASKS["lm-cls-ablation"].update(recipe=TASKS["lm-cls"]["recipe"],
                                partitions={"dirichlet0.1": TASKS["lm-cls"]["partitions"]["dirichlet0.1"]})
DEVICE = "cpu"  # --device: where every run trains ("cuda" uses the first GPU)
QUICK = {"num_rounds": 3, "strategies": ["fedit", "fedsmoothlora"], "seeds": 1}


class ClientLossRecorder(FederatedCallback):
    """Every logged training loss of every client round (run with ``logging_steps=1``).

    The trainer's ``round_history`` keeps one first loss and one mean loss per client round;
    the inter-round jump needs the last loss of a client's previous round, so the whole trace is kept.
    """

    def __init__(self):
        self.traces: list[dict] = []
        self._current: dict | None = None

    def on_client_begin(self, args, state, control, round, client, **kwargs):
        self._current = {"round": round, "client": client, "losses": []}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._current is not None and logs and "loss" in logs:
            self._current["losses"].append(float(logs["loss"]))

    def on_client_end(self, args, state, control, round, client, metrics, **kwargs):
        if self._current is not None and self._current["losses"]:
            self.traces.append(self._current)
        self._current = None


def client_loss_jumps(traces: list[dict]) -> list[float]:
    """first loss of a client round minus the same client's last loss in its previous round."""
    last_loss: dict[int, float] = {}
    jumps = []
    for trace in sorted(traces, key=lambda t: t["round"]):
        client = trace["client"]
        if client in last_loss:
            jumps.append(trace["losses"][0] - last_loss[client])
        last_loss[client] = trace["losses"][-1]
    return jumps


# ---------------------------------------------------------------------- tasks
def _tokens(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        out += [f"--{key}", *(str(v) for v in value)] if isinstance(value, list) else [f"--{key}", str(value)]
    return out


def pretrained_vit_body(va, args, tiny: bool) -> dict:
    """The recipe's digits-pretrained small ViT, trained once and cached (its body is reused by every run)."""
    from recipes.vit_classification import pretrain_small_vit

    key = f"vit_h{va.vit_hidden_size}_l{va.vit_layers}_p{va.patch_size}_s{va.pretrain_steps}_seed0.pt"
    path = CACHE_DIR / key
    if path.exists():
        return torch.load(path, weights_only=True)
    seed = args.seed
    args.seed = 0  # one source model for every run and seed: only the federated part varies
    model, info = pretrain_small_vit(va, args, main_proc=True)
    args.seed = seed
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    if not tiny:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(body, path)
        path.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return body


class VitTask:
    """The ViT recipe's offline setting; ``tiny``: a 1-layer ViT from scratch on sklearn digits."""

    def __init__(self, tiny: bool):
        self.tiny = tiny
        self._data = None
        self._body = None

    def build(self, options: dict, seed: int, out_dir: str):
        from recipes.offline_assets import load_image_classification_data
        from recipes.vit_classification import (
            digits_source_task,
            parse_args,
            small_vit_with_fresh_head,
            trainer_arguments,
        )

        options = dict(options)
        max_train, max_eval = options.pop("max_train_samples", None), options.pop("max_eval_samples", None)
        if self.tiny:
            options.update(vit_hidden_size=16, vit_layers=1, vit_heads=2, pretrain_steps=0)
        args, fed_args, va = parse_args(_tokens({**options, "output_dir": out_dir, "seed": seed, "logging_steps": 1,
                                                 "disable_tqdm": True, "use_cpu": DEVICE == "cpu"}))
        if self._data is None:  # one fixed data subset (seed 0) for every run: only the federation varies
            if self.tiny:
                train, evals = digits_source_task(0)
                self._data = (train, evals, [str(d) for d in range(10)], "sklearn-digits")
            else:
                self._data = load_image_classification_data(max_train, max_eval, seed=0)
        train, evals, class_names, source = self._data
        if self._body is None and not self.tiny:
            self._body = pretrained_vit_body(va, args, self.tiny)
        model = small_vit_with_fresh_head(va, class_names, self._body, seed)  # the recipe's fresh head
        info = {"data": source, "train": len(train), "eval": len(evals), "model": "tiny ViT from scratch"
                if self.tiny else f"small ViT (hidden {va.vit_hidden_size}, {va.vit_layers} layers) pretrained "
                f"{va.pretrain_steps} steps on sklearn digits"}
        return trainer_arguments(model, None, train, evals, args, fed_args, va), info


class NlgTask:
    """The NLG recipe's offline setting: SmolLM2-135M-Instruct, WordNet definitions, clients by category."""

    def __init__(self):
        self._data = None

    def build(self, options: dict, seed: int, out_dir: str):
        from recipes.nlg_llama import build, load_data, load_tokenizer, model_path, parse_args

        args, fed_args, md = parse_args(_tokens({**options, "output_dir": out_dir, "seed": seed, "logging_steps": 1,
                                                 "disable_tqdm": True, "use_cpu": DEVICE == "cpu"}))
        if self._data is None:  # one fixed tokenized copy (seed 0) for every run: only the federation varies
            self._data = load_data(md, load_tokenizer(model_path(md)), 0, keep=("category",))
        train, evals = self._data
        info = {"data": "WordNet definitions (recipes/data)", "train": len(train), "eval": len(evals),
                "model": "SmolLM2-135M-Instruct"}
        return build(args, fed_args, md, data=self._data), info


class LmClassificationTask:
    """SmolLM2-135M with a new classification head: WordNet word + gloss -> its lexicographer category.

    The offline analogue of the paper's ViT-on-CIFAR protocol: a pretrained foundation backbone,
    a fresh head trained in full (``modules_to_save``), clients split by label.
    """

    MODEL_OPTIONS = ("max_length", "max_train_samples", "max_eval_samples", "backbone_layers", "categories")

    def __init__(self):
        self._data = None

    @staticmethod
    def _examples(split: str, names: list[str] | None):
        """``names``: the categories kept, in label order (None: all 45)."""
        import re

        from recipes.offline_assets import load_wordnet_instructions

        ds = load_wordnet_instructions(split)
        present = set(ds["category"])
        names = names or sorted(present)
        unknown = set(names) - present
        if unknown:
            raise SystemExit(f"lm-cls categories: {sorted(unknown)} are not WordNet lexicographer categories")
        index = {n: i for i, n in enumerate(names)}
        ds = ds.filter(lambda r: r["category"] in index)

        def row(r):
            word = re.search(r'"(.*)"', r["instruction"]).group(1)
            return {"text": f"{word}: {r['output']}", "label": index[r["category"]]}

        return ds.map(row, remove_columns=ds.column_names), names

    def build(self, options: dict, seed: int, out_dir: str):
        from transformers import (
            AutoTokenizer,
            DataCollatorWithPadding,
            HfArgumentParser,
            LlamaForSequenceClassification,
            TrainingArguments,
        )

        from fedsmooth_hf import FederatedArguments
        from recipes.offline_assets import smollm2_checkpoint

        options = dict(options)
        extra = {k: options.pop(k) for k in self.MODEL_OPTIONS if k in options}
        parser = HfArgumentParser((TrainingArguments, FederatedArguments))
        args, fed_args = parser.parse_args_into_dataclasses(args=_tokens({
            "report_to": "none", "save_strategy": "no", "lr_scheduler_type": "constant",
            **options, "output_dir": out_dir, "seed": seed, "logging_steps": 1, "disable_tqdm": True,
            "use_cpu": DEVICE == "cpu"}))
        path = smollm2_checkpoint()
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if self._data is None:  # one fixed data subset for every run: only the federation varies
            wanted = extra.get("categories")
            train, names = self._examples("train", wanted.split(",") if wanted else None)
            evals, _ = self._examples("eval", names)
            if extra.get("max_train_samples"):
                train = train.shuffle(seed=0).select(range(min(int(extra["max_train_samples"]), len(train))))
            if extra.get("max_eval_samples"):
                evals = evals.shuffle(seed=0).select(range(min(int(extra["max_eval_samples"]), len(evals))))
            length = int(extra.get("max_length", 32))

            def encode(batch):
                return tokenizer(batch["text"], truncation=True, max_length=length)

            train = train.map(encode, batched=True, remove_columns=["text"])
            evals = evals.map(encode, batched=True, remove_columns=["text"])
            self._data = (train, evals, names)
        train, evals, names = self._data
        torch.manual_seed(seed + 1)  # the fresh head
        layers = int(extra.get("backbone_layers", 30))  # the first k pretrained decoder layers of 30
        model = LlamaForSequenceClassification.from_pretrained(path, num_labels=len(names), num_hidden_layers=layers)
        model.config.pad_token_id = tokenizer.pad_token_id
        info = {"data": f"WordNet word + gloss -> {len(names)} lexicographer categories", "train": len(train),
                "eval": len(evals), "model": f"SmolLM2-135M-Instruct (first {layers} of 30 decoder layers) "
                                             "+ new classification head"}
        return dict(model=model, args=args, fed_args=fed_args, train_dataset=train, eval_dataset=evals,
                    data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=_accuracy), info


def _accuracy(eval_pred) -> dict:
    import numpy as np

    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def make_task(name: str):
    if name.startswith("lm-cls"):
        return LmClassificationTask()
    if name.startswith("vit"):
        return VitTask(tiny=False)
    if name == "tiny":
        return VitTask(tiny=True)
    return NlgTask()  # nlg, nlg8


def run_one(task, options: dict, seed: int) -> dict:
    """One federated run; per-round eval metrics, per-client-round loss traces, timings."""
    recorder = ClientLossRecorder()
    with tempfile.TemporaryDirectory(prefix="convergence_") as out_dir:
        kwargs, info = task.build(options, seed, out_dir)
        kwargs["callbacks"] = [recorder]  # the sweep prints one line per run, not the recipe's per round
        trainer = FederatedTrainer(**kwargs)
        trainer.remove_callback(PrinterCallback)  # logging_steps=1 would print every step
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    history = trainer.round_history
    keep = ("round", "eval_loss", "eval_accuracy", "train_loss", "zeta", "rm_kept_median")
    rounds, trained_s = [], 0.0
    for r in history:
        # wall time of the rounds so far without their evaluations: local training, starts, server merge
        trained_s += r.get("round_time_s", 0.0) - r.get("eval_time_s", 0.0)
        if "eval_loss" in r:
            rounds.append({**{k: r[k] for k in keep if k in r}, "train_wall_s": trained_s})
    return {
        "rounds": rounds,
        "client_traces": recorder.traces,
        "wall_s": wall,
        "strategy_overhead_s": sum(r.get("strategy_overhead_s", 0.0) for r in history),
        "local_train_time_s": sum(r.get("local_train_time_s", 0.0) for r in history),
        "task_info": info,
    }


# ---------------------------------------------------------------------- analysis
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_metrics(run: dict, metric: str) -> dict:
    """Per-run figures: final metric, smoothness of the eval loss, accuracy drops, client loss jumps."""
    series = [r[metric] for r in run["rounds"]]
    losses = [r["eval_loss"] for r in run["rounds"]]
    tv = [abs(b - a) for a, b in zip(losses[1:], losses[2:])]  # rounds t >= 2
    jumps = client_loss_jumps(run["client_traces"])
    out = {
        "final": series[-1],
        # a non-IID global curve jumps from round to round: the last quarter's mean ranks methods more stably
        "last_quarter": statistics.fmean(series[-max(1, (len(series) - 1) // 4):]),
        "final_eval_loss": losses[-1],
        "eval_loss_mean_abs_change": statistics.fmean(tv) if tv else float("nan"),
        "client_loss_jump_mean": statistics.fmean(jumps) if jumps else float("nan"),
        "client_loss_jump_mean_abs": statistics.fmean(abs(j) for j in jumps) if jumps else float("nan"),
    }
    if metric == "eval_accuracy":
        out["accuracy_drops"] = sum(b < a for a, b in zip(series[1:], series[2:]))
    return out


def rounds_to_reach(series: list[dict], metric: str, target: float) -> int | None:
    higher_is_better = metric != "eval_loss"
    for r in series:
        value = r[metric]
        if (value >= target) if higher_is_better else (value <= target):
            return r["round"]
    return None


def seconds_to_reach(series: list[dict], round_reached: int | None) -> float | None:
    """Training wall time (evaluations left out) until the end of ``round_reached``; None if not recorded."""
    if round_reached is None:
        return None
    return next((r.get("train_wall_s") for r in series if r["round"] == round_reached), None)


def summarize(runs: list[dict], metric: str) -> dict:
    """Per partition and strategy/variant: mean +- std over seeds of every run figure, and rounds to FedIT."""
    summary: dict = {}
    for run in runs:
        summary.setdefault(run["partition"], {}).setdefault(run["name"], []).append(run)
    out = {}
    for partition, by_name in summary.items():
        reference = by_name.get(REFERENCE) or by_name.get(next(iter(by_name)))
        target = statistics.fmean(r["rounds"][-1][metric] for r in reference)
        rows = {}
        for name, group in by_name.items():
            per_run = [run_metrics(r, metric) for r in group]
            row = {"seeds": [r["seed"] for r in group]}
            for key in per_run[0]:
                mean, std = _mean_std([m[key] for m in per_run])
                row[key] = {"mean": mean, "std": std}
            reached = [rounds_to_reach(r["rounds"], metric, target) for r in group]
            row["rounds_to_reference"] = {"per_seed": reached, "target": target,
                                          "mean_of_reached": _mean_std([x for x in reached if x is not None])[0],
                                          "reached": sum(x is not None for x in reached), "of": len(reached)}
            seconds = [seconds_to_reach(r["rounds"], k) for r, k in zip(group, reached)]
            row["train_s_to_reference"] = _mean_std([s for s in seconds if s is not None])[0]
            row["wall_s_mean"] = statistics.fmean(r["wall_s"] for r in group)
            rows[name] = row
        out[partition] = {"reference": REFERENCE if REFERENCE in by_name else next(iter(by_name)),
                          "reference_final": target, "rows": rows}
    return out


def format_table(summary: dict, metric: str) -> str:
    lines = []
    fmt = (lambda v: f"{100 * v:.2f}") if metric == "eval_accuracy" else (lambda v: f"{v:.4f}")
    for partition, block in summary.items():
        label = "accuracy %" if metric == "eval_accuracy" else "eval loss"
        lines.append(f"[{partition}] reference: {block['reference']} final {label} {fmt(block['reference_final'])}")
        head = (f"{'strategy':<40}{'final ' + label:>20}{'rounds to ref':>15}{'|dLoss| t>=2':>16}"
                f"{'client jump':>14}{'|jump|':>10}{'s/run':>8}")
        lines += [head, "-" * len(head)]
        for name, row in block["rows"].items():
            rr = row["rounds_to_reference"]
            reach = f"{rr['mean_of_reached']:.1f} ({rr['reached']}/{rr['of']})" if rr["reached"] else f"- (0/{rr['of']})"
            final = f"{fmt(row['final']['mean'])} +- {fmt(row['final']['std'])}"
            lines.append(f"{name:<40}{final:>20}{reach:>15}{row['eval_loss_mean_abs_change']['mean']:>16.4f}"
                         f"{row['client_loss_jump_mean']['mean']:>14.4f}{row['client_loss_jump_mean_abs']['mean']:>10.4f}"
                         f"{row['wall_s_mean']:>8.0f}")
        lines.append("")
    return "\n".join(lines)


def format_markdown(summary: dict, metric: str) -> str:
    """The summary as markdown tables (pasted into docs/benchmarks.md)."""
    acc = metric == "eval_accuracy"
    fmt = (lambda v: f"{100 * v:.1f}") if acc else (lambda v: f"{v:.3f}")
    label = "final accuracy %" if acc else "final eval loss"
    lines = []
    for partition, block in summary.items():
        lines += [f"**{partition}** (reference: {block['reference']}, final {fmt(block['reference_final'])})", "",
                  f"| strategy | seeds | {label} | mean of the last quarter of rounds | rounds to reference (reached) "
                  f"| training s to reference | mean abs eval-loss change, t>=2 |"
                  + (" accuracy drops |" if acc else "") + " client loss jump (signed / abs) | s per run |",
                  "|---|---|---|---|---|---|---|" + ("---|" if acc else "") + "---|---|"]
        for name, row in block["rows"].items():
            rr = row["rounds_to_reference"]
            reach = f"{rr['mean_of_reached']:.1f} ({rr['reached']}/{rr['of']})" if rr["reached"] else f"never (0/{rr['of']})"
            drops = f" {row['accuracy_drops']['mean']:.1f} |" if acc else ""
            to_ref = row["train_s_to_reference"]
            to_ref = f"{to_ref:.0f}" if math.isfinite(to_ref) else "—"
            lines.append(f"| {name} | {len(row['seeds'])} | {fmt(row['final']['mean'])} ± {fmt(row['final']['std'])} "
                         f"| {fmt(row['last_quarter']['mean'])} ± {fmt(row['last_quarter']['std'])} | {reach} | {to_ref} "
                         f"| {row['eval_loss_mean_abs_change']['mean']:.4f} |{drops} "
                         f"{row['client_loss_jump_mean']['mean']:+.3f} / {row['client_loss_jump_mean_abs']['mean']:.3f} "
                         f"| {row['wall_s_mean']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict], metric: str, title: str, path: Path) -> None:
    """Eval metric (and loss) vs round, one line per strategy: mean over seeds, shaded min..max."""
    plt = pyplot()
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    partitions = list(dict.fromkeys(r["partition"] for r in runs))
    panels = ["eval_accuracy", "eval_loss"] if metric == "eval_accuracy" else ["eval_loss"]
    fig, axes = plt.subplots(len(partitions), len(panels), figsize=(5.2 * len(panels), 3.6 * len(partitions)),
                             squeeze=False)
    names = list(dict.fromkeys(r["name"] for r in runs))
    colors = plt.get_cmap("tab10")
    for i, partition in enumerate(partitions):
        for j, key in enumerate(panels):
            ax = axes[i][j]
            for k, name in enumerate(names):
                group = [r for r in runs if r["partition"] == partition and r["name"] == name]
                if not group:
                    continue
                rounds = [p["round"] for p in group[0]["rounds"]]
                values = np.array([[p[key] for p in r["rounds"]] for r in group])
                scale = 100.0 if key == "eval_accuracy" else 1.0
                style = {"linewidth": 2.2} if name.startswith("fedsmoothlora") or name.startswith("full") else {}
                ax.plot(rounds, scale * values.mean(0), color=colors(k), label=f"{name} (n={len(group)})", **style)
                if len(group) > 1:
                    ax.fill_between(rounds, scale * values.min(0), scale * values.max(0), color=colors(k), alpha=0.15)
            ax.set_xlabel("round (0 = before training)")
            ax.set_ylabel("eval accuracy (%)" if key == "eval_accuracy" else "eval loss")
            ax.set_title(f"{partition}: {key.replace('eval_', 'global ')}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def machine() -> dict:
    return {**common_machine(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "note": "shared machine: wall times were measured under load from other jobs"}


# ---------------------------------------------------------------------- main
def runs_reused_from(path: Path, options: dict, partitions: dict, configs: dict, seeds: int) -> list[dict]:
    """An ablation's default variant (and its FedIT, if listed) are the main sweep's runs: reuse them, not repeat them."""
    sweep = json.loads(path.read_text())
    if sweep["settings"]["recipe_options"] != options:
        return []
    names = {}
    for name, config in configs.items():
        if config == {"strategy": "fedsmoothlora"}:
            names["fedsmoothlora"] = name
        elif config == {"strategy": "fedit"}:
            names["fedit"] = name
    return [{**r, "name": names[r["name"]], "reused_from": path.name} for r in sweep["runs"]
            if r["name"] in names and r["partition"] in partitions and r["seed"] < seeds]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--quick", action="store_true", help=f"{QUICK['num_rounds']} rounds, fedit + fedsmoothlora, 1 seed")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default per task)")
    p.add_argument("--rounds", type=int, default=None, help="communication rounds (default per task)")
    p.add_argument("--strategies", default=None, help=f"comma-separated (default: {','.join(STRATEGIES)})")
    p.add_argument("--partitions", default=None, help="comma-separated subset of the task's partitions")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe/federated argument, e.g. --set local_steps=10")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the runs train; results of a cuda sweep go to convergence_<task>_cuda.json")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--resume", action="store_true", help="keep finished runs from an existing JSON with the same settings")
    p.add_argument("--report-only", action="store_true", help="no new runs: table and plot from the existing JSON")
    return p


def main(argv: list[str] | None = None) -> dict:
    global DEVICE
    a = build_parser().parse_args(argv)
    DEVICE = a.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    spec = TASKS[a.task]
    options = dict(spec["recipe"])
    seeds = a.seeds or (QUICK["seeds"] if a.quick else spec["seeds"])
    if a.quick:
        options["num_rounds"] = QUICK["num_rounds"]
    if a.rounds:
        options["num_rounds"] = a.rounds
    for item in a.set:
        key, _, value = item.partition("=")
        options[key] = value
    partitions = {k: v for k, v in spec["partitions"].items()
                  if a.partitions is None or k in a.partitions.split(",")}
    if "variants" in spec:
        configs = {name: {"strategy": "fedsmoothlora", **over} for name, over in spec["variants"].items()}
        if a.quick:
            configs = dict(list(configs.items())[:2])
    else:
        names = (a.strategies.split(",") if a.strategies
                 else QUICK["strategies"] if a.quick else spec.get("strategies", STRATEGIES))
        unknown = set(names) - set(available_strategies())
        if unknown:
            raise SystemExit(f"--strategies: unknown {sorted(unknown)}; available: {available_strategies()}")
        configs = {name: {"strategy": name} for name in names}

    out_dir = Path(a.out_dir)
    json_path = out_dir / f"convergence_{a.task}{'_cuda' if DEVICE == 'cuda' else ''}.json"
    settings = {"task": a.task, "device": DEVICE, "recipe_options": options, "partitions": partitions, "seeds": list(range(seeds)),
                "configs": configs, "quick": a.quick,
                "threads": torch.get_num_threads()}
    runs: list[dict] = []
    if a.report_only and not json_path.exists():
        raise SystemExit(f"--report-only: no results at {json_path} (run the sweep first)")
    parent = out_dir / f"convergence_{spec['reuses']}{'_cuda' if DEVICE == 'cuda' else ''}.json" if "reuses" in spec else None
    if parent is not None and parent.exists():
        runs += runs_reused_from(parent, options, partitions, configs, seeds)
    if (a.resume or a.report_only) and json_path.exists():
        old = json.loads(json_path.read_text())
        if old["settings"]["recipe_options"] == options:
            kept = {(r["name"], r["partition"], r["seed"]) for r in runs}
            runs += [r for r in old["runs"] if r["name"] in configs and r["partition"] in partitions
                     and (r["name"], r["partition"], r["seed"]) not in kept]
            print(f"[convergence] resuming: {len(runs)} runs kept from {json_path}", flush=True)
    done = {(r["name"], r["partition"], r["seed"]) for r in runs}
    task = make_task(a.task)
    metric = spec["metric"]
    result = {"benchmark": "convergence", "settings": settings, "machine": machine()}
    t_start = time.perf_counter()
    skip = set(spec.get("skip", []))
    total = (len(configs) * len(partitions) - len(skip & {(n, p) for n in configs for p in partitions})) * seeds
    for seed in ([] if a.report_only else range(seeds)):  # seeds outermost: an interrupted sweep still has every strategy side by side
        for partition, part_options in partitions.items():
            for name, config in configs.items():
                if (name, partition, seed) in done or (name, partition) in skip:
                    continue
                if parent is not None and parent.exists():  # the main sweep may have finished it meanwhile
                    landed = [r for r in runs_reused_from(parent, options, {partition: part_options},
                                                          {name: config}, seeds) if r["seed"] == seed]
                    if landed:
                        runs += landed
                        continue
                run = run_one(task, {**options, **part_options, **config}, seed)
                run.update(name=name, partition=partition, seed=seed, options=config)
                runs.append(run)
                final = run["rounds"][-1]
                print(f"[convergence] {len(runs)}/{total} {partition} {name} seed {seed}: "
                      f"{metric}={final[metric]:.4f} eval_loss={final['eval_loss']:.4f} ({run['wall_s']:.0f} s)",
                      flush=True)
                result.update(runs=runs, summary=summarize(runs, metric))
                out_dir.mkdir(parents=True, exist_ok=True)
                json_path.write_text(json.dumps(result, indent=1) + "\n")
    result.update(runs=runs, summary=summarize(runs, metric), total_time_s=time.perf_counter() - t_start)
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result["summary"], metric))
    json_path.with_suffix(".md").write_text(format_markdown(result["summary"], metric))
    info = runs[0]["task_info"]
    title = (f"{a.task}: {info['model']}\non {info['data']} ({info['train']} train / {info['eval']} eval),\n"
             f"{options['num_clients']} clients ({options.get('clients_per_round', 'all or per partition')}/round), "
             f"{options['num_rounds']} rounds x {options['local_steps']} steps x batch "
             f"{options['per_device_train_batch_size']};\nmean over seeds, shaded min..max")
    png = json_path.with_suffix(".png")
    plot(runs, metric, title, png)
    print(f"wrote {json_path} and {png}")
    return result


if __name__ == "__main__":
    main()
