"""Export of the federated result: the merged model, a PEFT adapter, a model card, the Hub.

The global model is ``W (+ s * B_g A_g)`` per adapted layer, plus any fully
trained modules (``modules_to_save``). :func:`merged_state_dict` writes exactly
that into the architecture's own parameter names, so the export is a plain
``PreTrainedModel`` that ``from_pretrained`` loads with no PEFT involved.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..math.factors import Factors
from ..math.lowrank import dense_top_svd
from ..model.adapter import lora_scaling, wrap_lora
from ..model.merge import dense_base_weight, is_quantized
from ..version import __version__

__all__ = ["merged_state_dict", "save_merged_model", "export_lora_adapter", "model_card", "write_model_card",
           "push_folder_to_hub"]



def _base_name(name: str) -> str:
    """A PeftModel module name as the base architecture names it (``base_model.model.`` dropped)."""
    return name.removeprefix("base_model.model.")


@torch.no_grad()
def merged_weight(layer: nn.Module, global_factors: Factors | None, adapter_name: str = "default") -> torch.Tensor:
    """Dense fp32 ``W + residual + s * B_g A_g`` of one adapted layer, shaped like the original weight."""
    W = dense_base_weight(layer)
    if global_factors is not None:
        B, A = global_factors
        W = W + lora_scaling(layer, adapter_name) * (B.float().to(W.device) @ A.float().to(W.device))
    if getattr(layer, "fan_in_fan_out", False):
        W = W.T
    return W


@torch.no_grad()
def merged_state_dict(
    peft_model: nn.Module,
    layers: Mapping[str, nn.Module],
    global_lora: Mapping[str, Factors] | None,
    adapter_name: str = "default",
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """State dict of the global model under the base architecture's parameter names.

    Adapted layers get their merged weight; ``modules_to_save`` copies replace the
    originals; LoRA parameters disappear. ``dtype`` casts floating tensors (default:
    the dtype of each layer's base weight, fp16 for a quantized base).
    """
    base = peft_model.get_base_model()
    adapted = {_base_name(name) for name in layers}
    sd = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key or "lora_magnitude" in key:
            continue
        key = key.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter_name}.", ".")
        owner, sep, _ = key.partition(".weight.")
        if sep and owner in adapted:
            continue  # bitsandbytes quantization state stored under the weight's name: not in a dense export
        sd[key] = value
    for name, layer in layers.items():
        base_layer = layer.get_base_layer()
        target = dtype or (torch.float16 if is_quantized(base_layer) else base_layer.weight.dtype)
        g = None if global_lora is None else global_lora.get(name)
        sd[f"{_base_name(name)}.weight"] = merged_weight(layer, g, adapter_name).to(target).cpu().contiguous()
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def save_merged_model(
    peft_model: nn.Module,
    layers: Mapping[str, nn.Module],
    global_lora: Mapping[str, Factors] | None,
    output_dir: str | os.PathLike,
    processing_class=None,
    adapter_name: str = "default",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the global model as a plain ``from_pretrained``-loadable checkpoint.

    ``dtype``: cast every floating tensor (and say so in ``config.json``); default: the
    base model's own dtypes, so a bf16 base is not saved at twice its size.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    base = peft_model.get_base_model()
    sd = merged_state_dict(peft_model, layers, global_lora, adapter_name, dtype)
    quant = getattr(base.config, "quantization_config", None)
    if quant is not None:
        # the export is dense: drop the 4-bit recipe from the saved config only
        del base.config.quantization_config
    try:
        base.save_pretrained(output_dir, state_dict=sd, safe_serialization=True)
    finally:
        if quant is not None:
            base.config.quantization_config = quant
    if dtype is not None:
        # save_pretrained records the in-memory model's dtype; from_pretrained(dtype="auto") reads this one
        config_file = output_dir / "config.json"
        config = json.loads(config_file.read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if processing_class is not None:
        processing_class.save_pretrained(output_dir)
    return output_dir


@torch.no_grad()
def export_lora_adapter(
    peft_model: nn.Module,
    layers: Mapping[str, nn.Module],
    global_lora: Mapping[str, Factors] | None,
    original_model: nn.Module,
    output_dir: str | os.PathLike,
    rank: int,
    adapter_name: str = "default",
    config_class: type | None = None,
    config_fields: Mapping | None = None,
) -> Path:
    """Save the cumulative update ``merged - original`` as a rank-``rank`` PEFT LoRA adapter.

    ``config_class`` (default ``peft.LoraConfig``) and ``config_fields`` make its config: the
    trainer records there how the run's clients were started (``FederatedLoraConfig`` with the
    FedSmoothLoRA options); plain peft loads it and ignores the fields it does not know.

    ``original_model`` is the model training started from (e.g. reloaded with
    ``from_pretrained``); it is wrapped in place with the exported adapter. Each
    layer's difference is computed densely one layer at a time and truncated to
    ``rank`` with an SVD (exact for small layers), so the adapter is the best
    rank-``rank`` approximation of what federated training changed. A run started from a residual
    init (PiSSA, LoRA-GA, ...) changed the original weights by ``s (B_g A_g - B_0 A_0)``, up to rank
    ``2 r``: ``rank=2*r`` exports it exactly.
    """
    from peft import LoraConfig

    rel_names = {name: _base_name(name) for name in layers}
    originals = dict(original_model.named_modules())
    for name, rel in rel_names.items():
        if rel not in originals:
            raise ValueError(f"original_model has no module '{rel}': it is not the model training started from")
        if min(layers[name].out_features, layers[name].in_features) < rank:
            raise ValueError(f"rank={rank} exceeds the dimensions of layer '{rel}'")
    train_config = peft_model.peft_config[adapter_name]
    config_fields = dict(config_fields or {})
    if train_config.init_lora_weights is not True and hasattr(config_class, "trained_from_init"):
        config_fields["trained_from_init"] = str(train_config.init_lora_weights)  # the run's start, as a record
    config = (config_class or LoraConfig)(
        r=rank,
        lora_alpha=rank,  # scale 1: the factors carry the update
        target_modules=sorted(rel_names.values()),
        modules_to_save=train_config.modules_to_save,
        init_lora_weights=True,  # never a PiSSA/LoRA-GA init again: the factors below are the whole change
        **config_fields,
    )
    exported = wrap_lora(original_model, config)
    wanted = set(rel_names.values())
    new_layers = {_base_name(n): m for n, m in exported.named_modules() if _base_name(n) in wanted}
    for name, rel in rel_names.items():
        g = None if global_lora is None else global_lora.get(name)
        merged = merged_weight(layers[name], g, adapter_name)
        W0 = originals[rel].weight.detach().float()
        if getattr(layers[name], "fan_in_fan_out", False):
            merged, W0 = merged.T, W0.T
        U, S, V = dense_top_svd(merged.to(W0.device) - W0, rank)
        root = S.sqrt()
        target = new_layers[rel]
        target.lora_B["default"].weight.copy_(U * root)
        target.lora_A["default"].weight.copy_(root[:, None] * V.T)
    # fully trained modules: copy the global values
    trained = {k: v for k, v in peft_model.named_parameters() if ".modules_to_save." in k}
    params = dict(exported.named_parameters())
    for k, v in trained.items():
        params[k].copy_(v)
    output_dir = Path(output_dir)
    exported.save_pretrained(output_dir)
    return output_dir


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def model_card(
    base_model: str,
    fed_args: Mapping,
    strategy: Mapping,
    round_history: list[dict],
    final_metrics: Mapping[str, float] | None = None,
    *,
    privacy: Mapping | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_args: str | list[str] | None = None,
) -> str:
    """A README.md for the Hub: what was trained, how, and how well.

    ``privacy``: the client-level DP settings in force (``ClientLevelDP.describe()``), with the
    epsilon spent. The other keyword arguments are ``Trainer.create_model_card``'s, so an
    upstream script's call describes the federated run. A local ``base_model`` path is named by its last
    component only: a path says nothing on the Hub, and the Hub rejects it as ``base_model``.
    """
    final_metrics = dict(final_metrics or {})
    evals = [r for r in round_history if "eval_loss" in r]
    base_model = finetuned_from or base_model
    base_name = base_model if is_hub_repo_id(base_model) else Path(base_model).name
    datasets = _as_list(dataset_tags) or _as_list(dataset)
    on_data = f" on {', '.join(_as_list(dataset))}" if dataset else ""
    if dataset_args:
        on_data += f" ({', '.join(_as_list(dataset_args))})"
    lines = [
        "---",
        "library_name: transformers",
        f"license: {license}" if license else None,
        *(["language:"] + [f"- {x}" for x in _as_list(language)] if language else []),
        "tags:",
        "- federated-learning",
        "- lora",
        f"- {strategy.get('strategy', fed_args.get('strategy'))}",
        "- fedsmooth_hf",
        *[f"- {t}" for t in _as_list(tags)],
        *(["datasets:"] + [f"- {d}" for d in datasets] if datasets else []),
        f"pipeline_tag: {_as_list(tasks)[0]}" if tasks else None,
        f"base_model: {base_model}" if is_hub_repo_id(base_model) else None,
        "---",
        "",
        f"# {model_name or ('Federated fine-tune of ' + base_name if base_name else 'Federated fine-tune')}",
        "",
        f"Fine-tuned from {base_name or 'a base model'}{on_data} with fedsmooth_hf {__version__} "
        f"(federated LoRA for transformers.Trainer) using **{fed_args.get('strategy')}** "
        f"over {fed_args.get('num_clients')} clients ({fed_args.get('clients_per_round')} per round), "
        f"{len([r for r in round_history if r.get('round', 0) > 0 and 'train_loss' in r])} rounds of "
        f"{fed_args.get('local_steps')} local steps, partition `{fed_args.get('partition')}`. "
        "The LoRA updates were merged into the base weights: this is a plain model, no adapter needed.",
        "",
        "## Federated setup",
        "",
        "| argument | value |",
        "|---|---|",
    ]
    for key in ("strategy", "num_clients", "clients_per_round", "num_rounds", "local_steps", "lora_r", "lora_alpha",
                "use_rslora", "partition", "dirichlet_alpha", "partition_column"):
        if key in fed_args:
            lines.append(f"| {key} | {fed_args[key]} |")
    # the algorithm's own options, as it describes them (FederatedStrategy.card_fields)
    lines += [f"| {key} | {value} |" for key, value in strategy.items() if key != "strategy"]
    if privacy:
        lines += ["", "## Differential privacy", "",
                  f"Client-level DP: epsilon = {privacy['epsilon']:.3g} at delta = {privacy['delta']:.3g} over "
                  f"{privacy['rounds']} rounds; the unit of privacy is one {privacy['unit']}.", "",
                  "| setting | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in privacy.items() if key not in ("unit",)]
    if evals:
        lines += ["", "## Evaluation by round", "", "| round | eval_loss |", "|---|---|"]
        lines += [f"| {r['round']} | {r['eval_loss']:.4f} |" for r in evals]
    if final_metrics:
        lines += ["", "## Final metrics", "", "```json", json.dumps(final_metrics, indent=1, sort_keys=True), "```"]
    return "\n".join(line for line in lines if line is not None) + "\n"


def _init_field(peft_configs: Mapping) -> dict:
    """The model card's ``init_lora_weights`` row, when the run did not start from peft's default adapter."""
    init = getattr(peft_configs.get("default"), "init_lora_weights", True)
    return {} if init is True else {"init_lora_weights": init}


def write_model_card(trainer, output_dir: str | os.PathLike, **card_args) -> Path:
    """Write ``output_dir/README.md`` for a ``FederatedTrainer``'s run (``card_args``: see :func:`model_card`)."""
    evals = [r for r in trainer.round_history if "eval_loss" in r]
    card = model_card(
        getattr(trainer.model.get_base_model().config, "_name_or_path", "") or "",
        trainer.fed_args.to_dict(),
        {**trainer.strategy.card_fields(), **_init_field(trainer.model.peft_config)},
        trainer.round_history,
        {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else None,
        privacy=None if trainer.privacy is None else {**trainer.privacy.describe(), "rounds": trainer.privacy.rounds,
                                                      "epsilon": trainer.privacy.epsilon()},
        **card_args,
    )
    path = Path(output_dir, "README.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(card)
    return path


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool | None = None,
                       commit_message: str = "Upload federated fine-tuned model",
                       ignore_patterns: list[str] | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (minus ``ignore_patterns``); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             ignore_patterns=ignore_patterns)
    return str(info)


def is_hub_repo_id(name: str) -> bool:
    """True for ``org/name``-style Hub ids; False for local paths (the Hub rejects those as base_model)."""
    return bool(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not os.path.isdir(name) \
        and "--" not in name and ".." not in name


def push_output_dir(args, token: str | None = None, commit_message: str | None = None) -> str:
    """Upload ``args.output_dir`` to ``args.hub_model_id`` (default: the folder's name): the model and its
    card only, federated checkpoints stay local."""
    repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
    return push_folder_to_hub(args.output_dir, repo_id, token=token or args.hub_token, private=args.hub_private_repo,
                              commit_message=commit_message or "Upload federated fine-tuned model",
                              ignore_patterns=["round-*", ".round-*", "checkpoint-*", "_*"])
