"""The LoRA config of a federated run: peft's ``LoraConfig`` carrying the method's options.

peft keeps the options of a data-dependent init beside the LoRA config that uses it
(``LoraConfig(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(...))``).
FedSmoothLoRA's client starts are such an init, run at every client round, so its
options travel the same way::

    peft_config = FederatedLoraConfig(r=8, lora_alpha=16,
                                      fedsmoothlora_config=FedSmoothLoRAConfig(zeta_mode="cosine"))
    trainer = FederatedTrainer(model, args, fed_args=fed_args, peft_config=peft_config, ...)

The config is saved with an exported adapter (``adapter_config.json`` records how the
run's adapters were started); plain peft loads that file and ignores the extra key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from peft import LoraConfig

from ..strategies import FedSmoothLoRAConfig

__all__ = ["FederatedLoraConfig", "resolve_strategy_config", "add_lora_for_run"]


@dataclass
class FederatedLoraConfig(LoraConfig):
    """``peft.LoraConfig`` plus the options of FedSmoothLoRA's client starts.

    Args:
        fedsmoothlora_config: :class:`~fedsmooth_hf.strategies.FedSmoothLoRAConfig` (or its dict);
            ``None``: its defaults. Read only when the run's strategy is ``fedsmoothlora``.
        trained_from_init: set by ``export_adapter`` only: the run's ``init_lora_weights`` when it was not
            peft's default. The exported adapter keeps ``init_lora_weights=True``, since it holds the whole change
            from the original weights and loading it must not rewrite them as PiSSA or LoRA-GA would.
        **kwargs: every ``peft.LoraConfig`` field (``r``, ``lora_alpha``, ``target_modules``,
            ``init_lora_weights``, ...). With ``target_modules=None`` every ``nn.Linear`` but the
            output head is adapted, as without a config.
    """

    fedsmoothlora_config: FedSmoothLoRAConfig | dict | None = field(
        default=None, metadata={"help": "FedSmoothLoRA's Round-Matching and Gradient-Aligned options."}
    )
    trained_from_init: str | None = field(
        default=None, metadata={"help": "An exported adapter's record of the init_lora_weights its run started "
                                        "from (the adapter itself is relative to the original base weights)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.fedsmoothlora_config, dict):
            self.fedsmoothlora_config = FedSmoothLoRAConfig(**self.fedsmoothlora_config)

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.fedsmoothlora_config is not None:
            out["fedsmoothlora_config"] = asdict(self.fedsmoothlora_config)
        return out


def resolve_strategy_config(strategy_name: str, lora_config, *sources):
    """The options of ``strategy_name`` for this run, from the one place the user set them.

    ``lora_config``: the run's LoRA config (a :class:`FederatedLoraConfig` carries them);
    ``sources``: other holders with a ``strategy_config()`` (``FederatedTrainingArguments``, and the
    deprecated keywords of ``FederatedArguments``). Set in two places, they must agree.
    """
    given = [c for c in (getattr(lora_config, f"{strategy_name}_config", None),
                         *(s.strategy_config() for s in sources if hasattr(s, "strategy_config"))) if c is not None]
    if not given:
        return None
    if any(c != given[0] for c in given[1:]):
        raise ValueError(
            f"the options of strategy '{strategy_name}' are given twice and differ: {given[0]} vs {given[1]}; "
            f"set them once (the LoRA config's {strategy_name}_config, or the arguments' fields)"
        )
    return given[0]


def add_lora_for_run(model, fed_args, peft_config, args, init_dataset=None, data_collator=None,
                     processing_class=None):
    """``model`` wrapped with the run's LoRA adapter, started from the config's ``init_lora_weights``.

    A non-default init is checked against the strategy first (only one that keeps a shared adapter
    can start from it); LoRA-GA is calibrated on ``init_dataset``, the server's own examples, in
    batches of the run's size made by the run's collator, before peft wraps the model
    (:mod:`fedsmooth_hf.model.peft_init`). The clients' data is never touched for it.
    """
    from peft import PeftModel
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, default_data_collator

    from ..model.adapter import ADAPTER, add_lora, find_target_modules
    from ..model.peft_init import calibrate_lora_ga, check_init_supported
    from ..strategies.registry import strategy_class

    wrapped = isinstance(model, PeftModel)
    config = model.peft_config.get(ADAPTER) if wrapped else peft_config
    check_init_supported(config, fed_args.strategy, strategy_class(fed_args.strategy).accepts_peft_init,
                         init_dataset, fed_args.client_parallel and args.world_size > 1, wrapped)
    if not wrapped and config is not None and config.init_lora_weights == "lora_ga":
        if config.target_modules is None:  # as add_lora resolves it, so the calibrated layers are the adapted ones
            config.target_modules = find_target_modules(model, config.modules_to_save or ())
        if args.place_model_on_device and getattr(model, "hf_device_map", None) is None:
            model = model.to(args.device)  # where Trainer puts it anyway: calibrate there
        if data_collator is None:  # Trainer's default
            is_tokenizer = isinstance(processing_class, PreTrainedTokenizerBase)
            data_collator = DataCollatorWithPadding(processing_class) if is_tokenizer else default_data_collator
        calibrate_lora_ga(model, config, init_dataset, data_collator, args.per_device_train_batch_size, args.device)
    return add_lora(model, fed_args, peft_config)
