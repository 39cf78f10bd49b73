"""FedSmoothLoRA's options, one dataclass that validates itself.

As peft carries a data-dependent init's options in a sub-config of the LoRA config
(``LoraConfig(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(...))``), a
federated run carries these in ``FederatedLoraConfig(fedsmoothlora_config=...)``; the
recipes parse the same dataclass from the command line (``--zeta_mode``, ``--ga_samples``).
The help texts are the command line's; docs/method.md explains each choice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ...math.sketch import GA_ESTIMATORS
from ..base import StrategyOptionError

__all__ = ["FedSmoothLoRAConfig", "ZETA_MODES", "STALE_ROUND_MATCHING"]

ZETA_MODES = ("auto", "constant", "cosine")
STALE_ROUND_MATCHING = ("continuity", "reset", "paper")


@dataclass
class FedSmoothLoRAConfig:
    """The Round-Matching and Gradient-Aligned client starts of FedSmoothLoRA.

    Args:
        ga_samples: calibration examples per client round for the Gradient-Aligned start.
        ga_batch_size: batch size of that gradient pass.
        ga_estimator: how the top-2r gradient subspace is found: ``"sketch"`` or ``"dense"``.
        gamma: stable-scale constant, GA factors scaled by ``d_out^(1/4) / sqrt(gamma)``.
        zeta: Round-Matching weight (0 disables Round-Matching).
        zeta_mode: schedule of zeta over rounds: ``"auto"``, ``"constant"`` or ``"cosine"``.
        min_zeta: final zeta of the cosine schedule.
        stale_round_matching: start of a client whose last round was not the previous one.
        exact_round_matching: keep the whole Round-Matching term in the frozen offset (a variant).
        ga_init: ``False`` is the ablation without Gradient-Aligned starts.
    """

    ga_samples: int = field(
        default=64, metadata={"help": "Calibration examples per client round for the Gradient-Aligned init."}
    )
    ga_batch_size: int = field(default=8, metadata={"help": "Batch size of the gradient estimation pass."})
    ga_estimator: str = field(
        default="sketch",
        metadata={"help": f"FedSmoothLoRA only: how the top-2r gradient subspace is found, one of {GA_ESTIMATORS}. "
                          "'sketch': streaming randomized sketches (d_out (2r + 8) + d_in (2r + 24) floats per layer, "
                          "never the dense gradient); 'dense': every layer's dense gradient and its SVD (published)."},
    )
    gamma: float = field(
        default=64.0, metadata={"help": "Stable-scale gamma: GA factors scaled by d_out^(1/4)/sqrt(gamma)."}
    )
    zeta: float = field(default=1.0, metadata={"help": "Round-Matching weight zeta (0 disables Round-Matching)."})
    zeta_mode: str = field(
        default="auto",
        metadata={"help": "FedSmoothLoRA: Round-Matching schedule over rounds, auto, constant or cosine. auto: "
                          "constant for an IID partition, cosine (to min_zeta) for any other split or user-given "
                          "client_datasets."},
    )
    min_zeta: float = field(default=0.0, metadata={"help": "Final zeta of the cosine schedule."})
    stale_round_matching: str = field(
        default="continuity",
        metadata={"help": "FedSmoothLoRA: start of a client whose last round was not the previous one: continuity, "
                          "reset or paper (docs/method.md, partial participation)."},
    )
    exact_round_matching: bool = field(
        default=False,
        metadata={"help": "FedSmoothLoRA variant (not the paper's): keep the whole Round-Matching term in the frozen "
                          "offset and start LoRA at the Gradient-Aligned factors, so no part of W_rm is truncated."},
    )
    ga_init: bool = field(
        default=True,
        metadata={"help": "FedSmoothLoRA only: Gradient-Aligned client starts. False is an ablation: plain LoRA "
                          "init in round 0, Round-Matching only afterwards, no gradient estimation."},
    )

    def __post_init__(self):
        check_fedsmoothlora_options(self)

    def to_dict(self) -> dict:
        return asdict(self)


def check_fedsmoothlora_options(options) -> None:
    """The one check of these options, for this dataclass and for classes that inherit its fields
    (``FederatedTrainingArguments``); a :class:`StrategyOptionError` names the field."""

    def bad(name, why):
        raise StrategyOptionError(name, f"{type(options).__name__}.{name}={getattr(options, name)!r}: {why}")

    if options.ga_init and options.ga_samples < 1:
        bad("ga_samples", "must be >= 1: the Gradient-Aligned start estimates gradients (ga_init=False turns it off)")
    if options.ga_batch_size < 1:
        bad("ga_batch_size", "must be >= 1")
    if options.ga_estimator not in GA_ESTIMATORS:
        bad("ga_estimator", f"must be one of {GA_ESTIMATORS}")
    if not options.gamma > 0:
        bad("gamma", "must be > 0")
    if not options.zeta >= 0:
        bad("zeta", "must be >= 0 (0 turns Round-Matching off)")
    if options.zeta_mode not in ZETA_MODES:
        bad("zeta_mode", f"must be one of {ZETA_MODES}")
    if not options.min_zeta >= 0:
        bad("min_zeta", "must be >= 0")
    if options.stale_round_matching not in STALE_ROUND_MATCHING:
        bad("stale_round_matching", f"must be one of {STALE_ROUND_MATCHING}")
    if options.exact_round_matching and not options.ga_init:
        bad("exact_round_matching", "keeps W_rm beside the Gradient-Aligned start: it needs ga_init=True")
