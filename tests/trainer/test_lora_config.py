"""FedSmoothLoRA's options through the LoRA config (peft's sub-config pattern), and their records."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from fedsmooth_hf import (
    FederatedArguments,
    FederatedLoraConfig,
    FederatedTrainer,
    FederatedTrainingArguments,
    FedSmoothLoRAConfig,
)


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def _data(n: int = 32) -> Dataset:
    ids = [[(i + j) % 64 for j in range(8)] for i in range(n)]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 8] * n, "labels": ids})


def _args(tmp_path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to="none",
                             use_cpu=True, disable_tqdm=True, save_strategy="no")


FED = dict(num_clients=2, num_rounds=1, local_steps=1, save_rounds=-1, eval_rounds=0)


def test_peft_config_carries_the_method_options_into_the_strategy(tmp_path):
    method = FedSmoothLoRAConfig(zeta=0.5, zeta_mode="constant", gamma=16.0, ga_samples=8, ga_estimator="dense")
    peft_config = FederatedLoraConfig(r=2, lora_alpha=4, fedsmoothlora_config=method)
    trainer = FederatedTrainer(model=_model(), args=_args(tmp_path), fed_args=FederatedArguments(**FED),
                               peft_config=peft_config, train_dataset=_data())
    assert trainer.strategy.config == method
    assert (trainer.strategy.zeta, trainer.strategy.zeta_mode, trainer.strategy.gamma) == (0.5, "constant", 16.0)
    assert trainer.strategy.calibration() == (8, 8) and trainer.lora_rank == 2
    assert trainer.layers  # target_modules=None: every Linear but the head
    assert not any("lm_head" in name for name in trainer.layers)
    trainer.train()
    assert trainer.round_history[-1]["zeta"] == 0.5


def test_a_dict_sub_config_is_validated_like_the_dataclass():
    assert FederatedLoraConfig(r=2, fedsmoothlora_config={"zeta_mode": "cosine"}).fedsmoothlora_config.zeta_mode \
        == "cosine"
    with pytest.raises(ValueError, match="FedSmoothLoRAConfig.zeta_mode='linear'"):
        FederatedLoraConfig(r=2, fedsmoothlora_config={"zeta_mode": "linear"})


def test_options_given_twice_must_agree(tmp_path):
    args = FederatedTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, zeta=0.25, **FED)
    peft_config = FederatedLoraConfig(r=2, fedsmoothlora_config=FedSmoothLoRAConfig(zeta=0.75))
    with pytest.raises(ValueError, match="given twice and differ"):
        FederatedTrainer(model=_model(), args=args, peft_config=peft_config, train_dataset=_data())
    single = FederatedTrainer(model=_model(), args=args, train_dataset=_data())  # one class holds every field
    assert single.strategy.zeta == 0.25


def test_deprecated_keywords_still_configure_the_method(tmp_path):
    with pytest.warns(FutureWarning, match="moved to FedSmoothLoRAConfig"):
        fed = FederatedArguments(zeta_mode="constant", ga_samples=4, **FED)
    trainer = FederatedTrainer(model=_model(), args=_args(tmp_path), fed_args=fed, train_dataset=_data())
    assert trainer.strategy.config.ga_samples == 4 and trainer.strategy.zeta_mode == "constant"


def test_exported_adapter_records_its_start_and_loads_in_plain_peft(tmp_path):
    from peft import PeftModel

    method = FedSmoothLoRAConfig(zeta_mode="cosine", ga_samples=8)
    trainer = FederatedTrainer(model=_model(), args=_args(tmp_path / "run"), fed_args=FederatedArguments(**FED),
                               peft_config=FederatedLoraConfig(r=2, lora_alpha=4, fedsmoothlora_config=method),
                               train_dataset=_data())
    trainer.train()
    out = trainer.export_adapter(_model(), str(tmp_path / "adapter"))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["fedsmoothlora_config"]["zeta_mode"] == "cosine" and saved["fedsmoothlora_config"]["ga_samples"] == 8
    loaded = PeftModel.from_pretrained(_model(), str(out))  # plain peft: the extra key is ignored
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad(), trainer.global_model() as merged:
        want = merged(input_ids=ids).logits
    assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-4)


def test_changed_method_options_refuse_to_resume(tmp_path):
    fed = FederatedArguments(**{**FED, "save_rounds": 1})
    first = FederatedTrainer(model=_model(), args=_args(tmp_path), fed_args=fed, train_dataset=_data(),
                             peft_config=FederatedLoraConfig(r=2, fedsmoothlora_config={"gamma": 16.0}))
    first.train()
    again = FederatedTrainer(model=_model(), args=_args(tmp_path), fed_args=fed, train_dataset=_data(),
                             peft_config=FederatedLoraConfig(r=2, fedsmoothlora_config={"gamma": 32.0}))
    with pytest.raises(ValueError, match="strategy option gamma=16.0, but this run has 32.0"):
        again.train(resume_from_checkpoint=True)
