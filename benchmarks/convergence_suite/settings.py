"""The convergence sweeps: which recipe each task runs, with which arguments, partitions, strategies and seeds.

Each task's ``recipe`` entry holds recipe arguments (they override the recipe's own defaults; the
values are recorded in the results JSON, and ``--resume`` keeps a JSON's runs only when they match);
``partitions`` adds arguments per data split; ``variants`` (the ablations) replace the list of
strategies by named FedSmoothLoRA option sets; ``reuses`` names the main sweep whose FedIT and
default runs an ablation reuses instead of repeating them.
"""

from __future__ import annotations

from recipes.lm_classification import OFFLINE_CATEGORIES

STRATEGIES = ["fedit", "ffa_lora", "fedex_lora", "flexlora", "frlora", "fedsmoothlora"]
REFERENCE = "fedit"

# lm-cls's label space: the LM-classification recipe's ten WordNet categories of distinct domains.
LM_CLS_CATEGORIES = list(OFFLINE_CATEGORIES)

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
QUICK = {"num_rounds": 3, "strategies": ["fedit", "fedsmoothlora"], "seeds": 1}
