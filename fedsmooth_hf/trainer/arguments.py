"""FederatedArguments: everything about the federation, next to the user's TrainingArguments.

``TrainingArguments`` keeps meaning what it means in a plain HF script (optimizer,
learning rate, batch size, accumulation, precision, logging, output_dir); it now
applies to each client's local round. Its ``seed`` also seeds the federation (the
partition, client sampling and every local round), so one ``--seed`` fixes a run. This dataclass adds the rounds, the
clients, LoRA and the algorithm. ``HfArgumentParser((TrainingArguments,
FederatedArguments))`` reads both from the command line or a JSON/YAML file.

:class:`FederatedTrainingArguments` is the same fields in one ``TrainingArguments``
subclass (as ``Seq2SeqTrainingArguments`` is for ``Seq2SeqTrainer``), for scripts that
parse a single arguments class.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import asdict, dataclass, field, fields

from transformers import TrainingArguments

from ..data.partition import PARTITION_METHODS
from ..engine.privacy import DP_CLIPPING
from ..model.client_rank import resolve_client_ranks
from ..strategies import FedSmoothLoRAConfig, available_strategies, strategy_from_options
from ..strategies.base import FederatedStrategy, StrategyOptionError
from ..strategies.fedsmoothlora.config import check_fedsmoothlora_options
from ..strategies.registry import strategy_class

ROUND_LR_SCHEDULES = ("constant", "cosine")
CLIENT_FAILURE_POLICIES = ("raise", "skip")
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class FederatedArguments:
    """Arguments of a federated LoRA run (see ``docs/trainer.md``)."""

    strategy: str = field(
        default="fedsmoothlora",
        metadata={"help": f"Federated algorithm: one of {', '.join(available_strategies())}."},
    )
    num_clients: int = field(default=10, metadata={"help": "Number of clients K the training data is split into."})
    clients_per_round: int | None = field(
        default=None, metadata={"help": "Clients sampled per round (seeded); default: all num_clients."}
    )
    num_rounds: int = field(default=10, metadata={"help": "Communication rounds."})
    local_steps: int = field(
        default=10,
        metadata={"help": "Optimizer steps per client per round (TrainingArguments.max_steps of each local round)."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r (ignored if the model is already a PeftModel)."})
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha; the scale is alpha/r (alpha/sqrt(r) with rsLoRA)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilized LoRA scaling alpha/sqrt(r)."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module name suffixes to adapt; default: every nn.Linear except the output head."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full and averaged across clients (e.g. a new classifier head)."},
    )
    round_lr_schedule: str = field(
        default="constant",
        metadata={"help": f"Learning rate across rounds: one of {ROUND_LR_SCHEDULES} (cosine decays to round_min_lr)."},
    )
    round_min_lr: float = field(default=1e-6, metadata={"help": "Learning rate of the last round under cosine."})
    partition: str = field(
        default="iid", metadata={"help": f"How train_dataset is split over clients: one of {PARTITION_METHODS}."}
    )
    dirichlet_alpha: float = field(
        default=0.5, metadata={"help": "Concentration of the Dirichlet label split (smaller = more skewed)."}
    )
    partition_column: str | None = field(
        default=None,
        metadata={"help": "Column to split by: the category for 'column', the label for 'dirichlet' "
                          "(default label/labels)."},
    )
    client_ranks: list[int] = field(
        default_factory=list,
        metadata={"help": "Heterogeneous ranks: one LoRA rank per client (<= lora_r), or a shorter pattern that "
                          "repeats (e.g. 2 4 8). Empty: every client at lora_r."},
    )
    client_eval_fraction: float = field(
        default=0.0,
        metadata={"help": "Hold out this seeded share of every client's data (never trained on) and evaluate the "
                          "global model on each client's share every eval round: per-client metrics, mean, std, worst "
                          "(0 = off)."},
    )
    prox_mu: float = field(
        default=0.0,
        metadata={"help": "FedProx: add prox_mu/2 * ||theta - theta_start||^2 over the trained parameters to every "
                          "client's local loss (any strategy; 0 = off). The logged training loss includes it."},
    )
    server_optimizer: str = field(
        default="none",
        metadata={"help": "Server step on the round's pseudo-gradient (aggregate - current): none, avgm, adam, yogi, "
                          "adagrad. Strategies that merge a low-rank product (all but fedit, ffa_lora) take avgm "
                          "only."},
    )
    server_lr: float | None = field(
        default=None, metadata={"help": "Server learning rate (default: 1.0 for avgm, 0.01 for adam/yogi/adagrad)."}
    )
    server_momentum: float = field(default=0.9, metadata={"help": "avgm: momentum of the server step."})
    server_betas: list[float] = field(
        default_factory=lambda: [0.9, 0.99], metadata={"help": "adam/yogi/adagrad: moment decay rates b1 b2."}
    )
    server_tau: float = field(default=1e-3, metadata={"help": "adam/yogi/adagrad: adaptivity floor of the step."})
    save_rounds: int = field(
        default=0, metadata={"help": "Checkpoint every N rounds (0: only after the last round; -1: never)."}
    )
    eval_rounds: int = field(default=1, metadata={"help": "Evaluate the global model every N rounds (0: never)."})
    on_client_failure: str = field(
        default="raise",
        metadata={"help": f"A client that fails (error or non-finite upload): one of {CLIENT_FAILURE_POLICIES}."},
    )

    save_dtype: str = field(
        default="auto",
        metadata={"help": f"dtype of the merged model save_model() writes: one of {SAVE_DTYPES}. auto: the base "
                          "model's own dtype (fp16 for a 4-bit base)."},
    )

    client_parallel: bool = field(
        default=False,
        metadata={"help": "With N processes, train N different clients at once (one per process) instead of "
                          "data-parallel local rounds; uploads are gathered with torch.distributed."},
    )

    dp_noise_multiplier: float | None = field(
        default=None,
        metadata={"help": "Client-level DP (docs/privacy.md): Gaussian noise of std dp_noise_multiplier * dp_clip_norm "
                          "on every released sum. Setting it (or dp_target_epsilon) turns DP on."},
    )
    dp_target_epsilon: float | None = field(
        default=None,
        metadata={"help": "Client-level DP: calibrate the noise multiplier before training so that num_rounds rounds "
                          "spend at most this epsilon at dp_delta (instead of dp_noise_multiplier)."},
    )
    dp_clip_norm: float | None = field(
        default=None, metadata={"help": "Client-level DP: each client's contribution is clipped to this norm C."}
    )
    dp_clipping: str = field(
        default="fixed",
        metadata={"help": "Client-level DP: fixed (C as given) or adaptive (C follows dp_target_quantile of the "
                          "clients' norms, Andrew et al.; dp_clip_norm is its start)."},
    )
    dp_delta: float | None = field(
        default=None, metadata={"help": "Client-level DP: delta of the reported epsilon (default 0.1 / num_clients)."}
    )
    dp_sketch_width: int | None = field(
        default=None,
        metadata={"help": "Client-level DP, strategies that aggregate products: width k of the two-pass sketch that "
                          "releases the noisy sum (default 2 * lora_r + 8)."},
    )
    dp_target_quantile: float = field(
        default=0.5, metadata={"help": "Adaptive clipping: the share of clients whose norm C should cover."}
    )
    dp_clip_learning_rate: float = field(
        default=0.2, metadata={"help": "Adaptive clipping: geometric step of C per round."}
    )
    dp_clipped_count_stddev: float | None = field(
        default=None,
        metadata={"help": "Adaptive clipping: noise std of the count of unclipped clients (default "
                          "clients_per_round / 20); it is accounted for."},
    )
    dp_allow_client_metrics: bool = field(
        default=False,
        metadata={"help": "Under DP, allow per-client evaluation metrics (client_eval_fraction) to reach the server: "
                          "they are computed on a client's data and not covered by the DP guarantee."},
    )

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r}: {why}")

        self.strategy = strategy_class(self.strategy).name  # unknown names list the valid ones
        if self.num_clients < 1:
            bad("num_clients", "must be >= 1")
        if self.clients_per_round is None:
            self.clients_per_round = self.num_clients
        if not 1 <= self.clients_per_round <= self.num_clients:
            bad("clients_per_round", f"must be between 1 and num_clients={self.num_clients}")
        if self.local_steps < 1:
            bad("local_steps", "must be >= 1")
        if self.lora_alpha <= 0:
            bad("lora_alpha", "must be > 0")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1)")
        try:  # the strategy checks rank, rounds, client ranks and its own options (its config), once
            strategy = strategy_from_options(self.strategy, self.strategy_options())
            strategy.set_client_ranks(self.resolved_client_ranks())
        except StrategyOptionError as err:
            if not hasattr(self, err.option):  # an option of the strategy's config: its message names it
                raise ValueError(str(err)) from None
            bad(err.option, str(err))
        except ValueError as err:  # the client_ranks pattern itself
            bad("client_ranks", str(err))
        if self.round_lr_schedule not in ROUND_LR_SCHEDULES:
            bad("round_lr_schedule", f"must be one of {ROUND_LR_SCHEDULES}")
        if self.round_min_lr < 0:
            bad("round_min_lr", "must be >= 0")
        if self.partition not in PARTITION_METHODS:
            bad("partition", f"must be one of {PARTITION_METHODS}")
        if self.partition == "column" and not self.partition_column:
            bad("partition_column", "partition='column' needs the name of the column to split by")
        if self.dirichlet_alpha <= 0:
            bad("dirichlet_alpha", "must be > 0")
        if not 0 <= self.client_eval_fraction < 1:
            bad("client_eval_fraction", "must lie in [0, 1) (0 turns per-client evaluation off)")
        if not self.prox_mu >= 0:
            bad("prox_mu", "must be >= 0 (0 turns FedProx off)")
        if len(self.server_betas) != 2:
            bad("server_betas", "needs two values, b1 and b2")
        self.make_server_optimizer(strategy)  # names the field of any bad setting
        if self.save_rounds < -1:
            bad("save_rounds", "must be >= 0, or -1 for no federated checkpoints")
        if self.eval_rounds < 0:
            bad("eval_rounds", "must be >= 0")
        if self.on_client_failure not in CLIENT_FAILURE_POLICIES:
            bad("on_client_failure", f"must be one of {CLIENT_FAILURE_POLICIES}")
        if self.save_dtype not in SAVE_DTYPES:
            bad("save_dtype", f"must be one of {SAVE_DTYPES}")
        self._check_privacy(bad, strategy)

    def _check_privacy(self, bad, strategy) -> None:
        """The ``dp_*`` fields (only when DP is on, except a negative noise multiplier or clip)."""
        if self.dp_noise_multiplier is not None and not self.dp_noise_multiplier >= 0:
            bad("dp_noise_multiplier", "must be >= 0")
        if self.dp_clip_norm is not None and not self.dp_clip_norm > 0:
            bad("dp_clip_norm", "must be > 0")
        if self.dp_noise_multiplier is None and self.dp_target_epsilon is None:
            return
        if self.dp_noise_multiplier is not None and self.dp_target_epsilon is not None:
            bad("dp_target_epsilon", "give dp_noise_multiplier or dp_target_epsilon, not both")
        if self.dp_target_epsilon is not None and not self.dp_target_epsilon > 0:
            bad("dp_target_epsilon", "must be > 0")
        if self.dp_clip_norm is None:
            bad("dp_clip_norm", "client-level DP needs a clip norm C (the sensitivity every noise std scales)")
        if self.dp_clipping not in DP_CLIPPING:
            bad("dp_clipping", f"must be one of {DP_CLIPPING}")
        if self.dp_delta is not None and not 0 < self.dp_delta < 1:
            bad("dp_delta", "must lie in (0, 1)")
        if self.dp_delta is not None and self.dp_delta >= 1 / self.num_clients:
            bad("dp_delta", f"must be below 1/num_clients={1 / self.num_clients:g}: a larger delta allows "
                            "revealing one client's data outright")
        if self.dp_sketch_width is not None and self.dp_sketch_width < 1:
            bad("dp_sketch_width", "must be >= 1")
        if not 0 < self.dp_target_quantile < 1:
            bad("dp_target_quantile", "must lie in (0, 1)")
        if not self.dp_clip_learning_rate > 0:
            bad("dp_clip_learning_rate", "must be > 0")
        if self.dp_clipped_count_stddev is not None and not self.dp_clipped_count_stddev > 0:
            bad("dp_clipped_count_stddev", "must be > 0")
        if self.client_eval_fraction > 0 and not self.dp_allow_client_metrics:
            bad("client_eval_fraction", "per-client evaluation sends metrics computed on each client's data to the "
                                        "server, outside the DP guarantee; set dp_allow_client_metrics=True to accept "
                                        "that, or turn per-client evaluation off")
        if self.modules_to_save:
            bad("modules_to_save", "client-level DP covers LoRA contributions only: fully trained modules would "
                                   "reach the server unclipped and without noise")
        if type(strategy).aggregate_released is FederatedStrategy.aggregate_released:
            bad("strategy", f"'{self.strategy}' has no aggregate of released means, so it cannot run under DP")

    def resolved_dp_delta(self) -> float:
        """``dp_delta``, or its default ``0.1 / num_clients`` (below the 1/N that would allow a leak)."""
        return self.dp_delta if self.dp_delta is not None else 0.1 / self.num_clients

    def resolved_client_ranks(self, max_rank: int | None = None) -> list[int]:
        """One adapter rank per client (``client_ranks`` expanded; ``max_rank`` defaults to ``lora_r``)."""
        return resolve_client_ranks(self.client_ranks, self.num_clients, max_rank or self.lora_r)

    def strategy_options(self, iid_data: bool | None = None) -> dict:
        """Keyword arguments for the strategy's constructor: rank, rounds and its options (its config,
        from :meth:`strategy_config`). ``iid_data``: whether the clients' data is an IID split (None:
        unknown), for ``zeta_mode=auto``."""
        options = {"rank": self.lora_r, "num_rounds": self.num_rounds, "iid_data": iid_data}
        config = self.strategy_config()
        if config is not None:
            options["config"] = config
        return options

    def strategy_config(self):
        """The options of the chosen strategy given through these arguments (``None``: its defaults,
        or the config the LoRA config carries). Only the deprecated keywords of ``FederatedArguments``
        (``FederatedArguments(zeta=...)``) set it here; :class:`FederatedTrainingArguments` holds the fields."""
        moved = getattr(self, "moved_strategy_options", None)
        if not moved:
            return None
        return FedSmoothLoRAConfig(**moved)

    def make_server_optimizer(self, strategy):
        """The :class:`~fedsmooth_hf.math.server_optim.ServerOptimizer` these arguments describe, for ``strategy``
        (momentum at its rank; a combination without a factored form is refused)."""
        from ..math.server_optim import ServerOptimizer

        optimizer = ServerOptimizer(self.server_optimizer, self.server_lr, self.server_momentum,
                                    tuple(self.server_betas), self.server_tau, strategy.rank)
        optimizer.check_strategy(strategy)
        return optimizer

    def to_dict(self) -> dict:
        return asdict(self)


def _accept_moved_options(cls):
    """``FederatedArguments(zeta=...)``, from before FedSmoothLoRA's options moved to their own config:
    still accepted, with a FutureWarning, and used as that config."""
    init = cls.__init__
    moved_names = {f.name for f in fields(FedSmoothLoRAConfig)}

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        moved = {k: kwargs.pop(k) for k in list(kwargs) if k in moved_names}
        if moved:
            warnings.warn(
                f"FederatedArguments({', '.join(sorted(moved))}=...) is deprecated: FedSmoothLoRA's options moved to "
                "FedSmoothLoRAConfig, carried by the LoRA config: FederatedTrainer(..., peft_config="
                "FederatedLoraConfig(fedsmoothlora_config=FedSmoothLoRAConfig(...))) (docs/trainer.md)",
                FutureWarning, stacklevel=2)
        self.moved_strategy_options = moved
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


_accept_moved_options(FederatedArguments)


@dataclass
class FederatedTrainingArguments(TrainingArguments, FederatedArguments, FedSmoothLoRAConfig):
    """``TrainingArguments`` plus every :class:`FederatedArguments` and :class:`FedSmoothLoRAConfig`
    field, in one class.

    An upstream script federates by parsing this class instead of ``TrainingArguments``
    and building a ``FederatedTrainer`` instead of a ``Trainer``. The fields are
    inherited, not restated, so the classes always agree.
    """

    __repr__ = TrainingArguments.__str__  # the generated repr would print hub_token; TrainingArguments' hides it

    def __post_init__(self):
        TrainingArguments.__post_init__(self)
        check_fedsmoothlora_options(self)
        FederatedArguments.__post_init__(self)

    def federated_arguments(self) -> FederatedArguments:
        """The federated fields as a :class:`FederatedArguments` (what checkpoints record)."""
        return FederatedArguments(**{f.name: getattr(self, f.name) for f in fields(FederatedArguments)})

    def strategy_config(self) -> FedSmoothLoRAConfig | None:
        """FedSmoothLoRA's fields as a :class:`FedSmoothLoRAConfig` (None when all are at their defaults)."""
        config = FedSmoothLoRAConfig(**{f.name: getattr(self, f.name) for f in fields(FedSmoothLoRAConfig)})
        return None if config == FedSmoothLoRAConfig() else config


def resolve_federated_arguments(args: TrainingArguments | None,
                                fed_args: FederatedArguments | None) -> FederatedArguments:
    """The run's ``FederatedArguments``, from ``fed_args`` or from a ``FederatedTrainingArguments``, never both."""
    if isinstance(args, FederatedTrainingArguments):
        if fed_args is not None:
            raise ValueError(
                "FederatedTrainer got fed_args and FederatedTrainingArguments as args: the federated fields would be "
                "given twice; pass TrainingArguments with fed_args, or FederatedTrainingArguments alone"
            )
        return args.federated_arguments()
    return fed_args if fed_args is not None else FederatedArguments()
