"""The exported merged model and the exported adapter reproduce the federated global model."""

import pytest
import torch
from peft import PeftModel
from support.tiny import make_counting_dataset, make_tiny_llama, make_tiny_vit
from transformers import LlamaForCausalLM, TrainingArguments, ViTForImageClassification

from fedsmooth_hf import FederatedArguments, FederatedTrainer

IDS = torch.arange(20).reshape(2, 10) % 64


def _args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=50)


def _global_logits(trainer, **inputs):
    trainer.load_global_adapter()
    trainer.model.eval()
    with torch.no_grad():
        return trainer.model(**inputs).logits


def test_saved_merged_llama_reloads_with_same_logits(tmp_path):
    # FedIT keeps a non-zero global adapter, so the export must merge it
    fed = FederatedArguments(strategy="fedit", num_clients=2, num_rounds=2, local_steps=3, lora_r=4, lora_alpha=8)
    trainer = FederatedTrainer(model=make_tiny_llama(), args=_args(tmp_path), fed_args=fed,
                               train_dataset=make_counting_dataset(48), eval_dataset=make_counting_dataset(8, seed=2))
    trainer.train()
    expected = _global_logits(trainer, input_ids=IDS)
    out = tmp_path / "merged"
    trainer.save_model(str(out))
    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = reloaded(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "fedit" in card and "| num_clients | 2 |" in card and "eval_loss" in card
    assert (out / "federated_history.json").is_file()
    assert not any("lora" in k for k in reloaded.state_dict())


def test_saved_vit_with_trained_head_reloads(tmp_path):
    import datasets

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(40, 1, 8, 8, generator=gen)
    labels = (pixels.mean(dim=(1, 2, 3)) > 0).long()
    ds = datasets.Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.numpy()}).with_format("torch")
    fed = FederatedArguments(strategy="fedsmoothlora", num_clients=2, num_rounds=2, local_steps=2, lora_r=2,
                             lora_alpha=4, ga_samples=8, modules_to_save=["classifier"])
    model = make_tiny_vit(num_labels=2)
    head_before = model.classifier.weight.detach().clone()
    trainer = FederatedTrainer(model=model, args=_args(tmp_path), fed_args=fed, train_dataset=ds)
    trainer.train()
    x = pixels[:5]
    expected = _global_logits(trainer, pixel_values=x)
    trainer.save_model(str(tmp_path / "vit"))
    reloaded = ViTForImageClassification.from_pretrained(tmp_path / "vit").eval()
    with torch.no_grad():
        got = reloaded(pixel_values=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(reloaded.classifier.weight, head_before), "the averaged trained head must be exported"


# plain peft loads the exported config and warns about the fields it does not know (FederatedLoraConfig's:
# the method's options, the run's init); that it loads them is what the test checks, the warning is peft's
@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments:UserWarning")
def test_exported_adapter_reproduces_the_merged_model(tmp_path):
    # FedSmoothLoRA merges rank r per round: 2 rounds x r=4 => the cumulative update has rank <= 8
    fed = FederatedArguments(strategy="fedsmoothlora", num_clients=2, num_rounds=2, local_steps=3, lora_r=4,
                             lora_alpha=8, ga_samples=8)
    trainer = FederatedTrainer(model=make_tiny_llama(), args=_args(tmp_path), fed_args=fed,
                               train_dataset=make_counting_dataset(48))
    trainer.train()
    expected = _global_logits(trainer, input_ids=IDS)
    original = make_tiny_llama()  # the same pretrained starting point
    with torch.no_grad():
        before = original(input_ids=IDS).logits
    trainer.export_adapter(original, str(tmp_path / "adapter"), rank=8)
    fresh = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = fresh(input_ids=IDS).logits
    assert (expected - before).abs().max() > 1e-3, "training must have changed the model"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _read_dtypes(path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def _one_round(tmp_path, model, **fed):
    fed_args = FederatedArguments(strategy="fedit", num_clients=2, num_rounds=1, local_steps=1, lora_r=2,
                                  lora_alpha=4, **fed)
    trainer = FederatedTrainer(model=model, args=_args(tmp_path), fed_args=fed_args,
                               train_dataset=make_counting_dataset(16))
    trainer.train()
    return trainer


def test_merged_model_dtype_equals_the_base_models(tmp_path):
    bf16 = _one_round(tmp_path, make_tiny_llama().to(torch.bfloat16), modules_to_save=["lm_head"])
    bf16.save_model(str(tmp_path / "bf16"))
    assert _read_dtypes(tmp_path / "bf16") == {"BF16"}
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "bf16")
    assert reloaded.dtype == torch.bfloat16

    fp32 = _one_round(tmp_path, make_tiny_llama())
    fp32.save_model(str(tmp_path / "fp32"))
    assert _read_dtypes(tmp_path / "fp32") == {"F32"}


def test_save_dtype_asks_for_another_dtype(tmp_path):
    trainer = _one_round(tmp_path, make_tiny_llama(), save_dtype="bfloat16")
    expected = _global_logits(trainer, input_ids=IDS)
    trainer.save_model(str(tmp_path / "half"))
    assert _read_dtypes(tmp_path / "half") == {"BF16"}
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "half").eval()
    assert reloaded.dtype == torch.bfloat16, "config.json must say the saved dtype"
    with torch.no_grad():
        got = reloaded(input_ids=IDS).logits.float()
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)


def test_create_model_card_after_training_writes_the_federated_card(tmp_path):
    ckpt = tmp_path / "local-base"
    make_tiny_llama().save_pretrained(ckpt)
    trainer = _one_round(tmp_path / "out", LlamaForCausalLM.from_pretrained(ckpt))
    trainer.save_model()
    # what an upstream script (run_clm.py) calls after training
    trainer.create_model_card(tasks="text-generation", dataset="counting", dataset_args="v1", tags="mine")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "federated-learning" in card and "| num_clients | 2 |" in card and "fedit" in card
    assert "training_steps" not in card, "Trainer's own card would describe the last local round"
    assert "pypi.org" not in card
    title = next(line for line in card.splitlines() if line.startswith("# "))
    assert str(tmp_path) not in title and title == "# Federated fine-tune of local-base"
    assert "base_model:" not in card, "a local path is no Hub base_model"
    assert "- mine" in card and "pipeline_tag: text-generation" in card and "on counting (v1)" in card
    trainer.create_model_card(model_name="tiny-fed", finetuned_from="HuggingFaceTB/SmolLM2-135M-Instruct")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "# tiny-fed" in card and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
